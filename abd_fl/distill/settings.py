"""Typed settings of the ``distill`` group: one dataclass per synthesizer, the single source
of the values ``configs/distill/<name>.yaml`` ships.

The same objects serve two ways in:

- the Python API (``strategies.api``): ``ZSKT(iterations=200)``, ``DENSE()``, ...;
- Hydra: :func:`abd_fl.config_store.register_configs` stores each class as the schema
  ``distill/<name>_schema`` that ``configs/distill/<name>.yaml`` extends, so a YAML value, a
  command-line override and a keyword argument are checked against the same fields and
  types (OmegaConf rejects an unknown key or a wrong type), and the defaults cannot drift.

Range checks (``iterations >= 0``, a known ``kl_reduction``, ...) run when the objects are
used: :meth:`DistillSettings.loop_config` builds the loop's
:class:`~abd_fl.distill.loop.DistillConfig` and :meth:`DistillSettings.build_synthesizer` the
synthesizer, both validating their values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from abd_fl.distill.ensemble import DEFAULT_ENSEMBLE
from abd_fl.distill.loop import DistillConfig
from abd_fl.distill.synthesizers import Synthesizer, build_synthesizer


GENERATOR_SYNTHESIZERS = ("zskt", "dense", "cmi")
"""The synthesizers with a generator, whose width ``generator_width`` sets."""


@dataclass
class ZSKTParams:
    """ZSKT's generator (Micaelli & Storkey, 2019) as the ABD reference runs it
    (illidanlab/ABD ``zskt/solver.py``, ``zskt/main.py``; README "Design" lists each value's source)."""

    z_dim: int = 100
    """The reference's z_dim."""
    lr: float = 1e-3
    """Generator Adam lr ..."""
    cosine: bool = True
    """... annealed to 0 over the run (CosineAnnealingLR over the pseudo-batches)."""
    clip_grad_norm: Optional[float] = 5.0
    """Generator gradient norm clipped to this (None = off)."""
    z_reuse: bool = True
    """One z batch serves 1 generator step + ``student_steps`` student steps."""
    kl_reduction: str = "mean"
    """The generator's KL as ``F.kl_div(reduction="mean")``: a batch x class mean (``sum``: per sample)."""
    student_bn: str = "eval"
    """The student's BN in the generator step: ``eval`` (frozen) | ``train`` (the reference,
    which collapsed the 8x8 student: README)."""
    batch_size: int = 128
    output_activation: str = "sigmoid"
    """Images in pixel space [0, 1] (the reference: a BN head in normalised space)."""
    temperature: float = 1.0


@dataclass
class DENSEParams:
    """DENSE's generator (Zhang et al., NeurIPS 2022): BN-statistics + one-hot + adversarial losses."""

    z_dim: int = 256
    lr: float = 1e-3
    g_steps: int = 10
    batch_size: int = 64
    bn_weight: float = 1.0
    oh_weight: float = 1.0
    adv_weight: float = 1.0
    max_pool_size: int = 20000


@dataclass
class CMIParams:
    """CMI, Contrastive Model Inversion (Fang et al., IJCAI 2021). Loss weights are the CMI
    authors' CIFAR-10 set (bn 1, oh 0.5, adv 0.5, cr 0.8, cr_T 0.1); budgets are cut for the
    embedded 8x8 digits on 2 CPU cores (about the wall time of the zskt default)."""

    z_dim: int = 256
    lr: float = 1e-3
    g_steps: int = 10
    """Generator steps per round (CMI: 200)."""
    batch_size: int = 64
    """Images synthesised per round (CMI: 256)."""
    bn_weight: float = 1.0
    oh_weight: float = 0.5
    adv_weight: float = 0.5
    cr_weight: float = 0.8
    cr_temperature: float = 0.1
    head_dim: int = 128
    head_hidden: int = 256
    bank_size: int = 4096
    """Memory bank of past samples' features (CMI: 40960)."""
    n_neg: int = 256
    """Bank negatives per step (CMI: 4096)."""
    local_min_scale: float = 0.25
    """Local view: random resized crop, area in [0.25, 1]."""
    global_shift: float = 0.125
    """Global view: shift by up to 1/8 of the size (CMI: 4 px at 32)."""
    flip: bool = False
    """Mirror views (CMI: true); digits are not mirror-invariant."""
    reset_generator: bool = False
    """CMI re-initialises the generator every round; with 10 steps a round, keeping it learns
    more (8x8 digits probe: Acc 68% vs 50%)."""
    max_pool_size: int = 20000


@dataclass
class OODParams:
    """OOD patches (Asano & Saeed, 2021): augmented crops of ONE real image, with CutMix between
    patches (probability 1, Beta(0.25, 0.25), the ABD paper's appendix A). No generator."""

    image: str = "china"
    """scikit-learn's embedded photo ``china`` or ``flower`` (ignored when ``image_path`` is set)."""
    image_path: Optional[str] = None
    """Any file PIL reads."""
    num_patches: int = 2048
    """Pool cut at the start (the paper: 10,000 pre-sliced patches)."""
    batch_size: int = 64
    """Patches re-cut per iteration (oldest replaced)."""
    source_size: int = 256
    init_crop: float = 0.5
    min_scale: float = 0.002
    degrees: float = 30.0
    shear: float = 30.0
    flip: bool = True
    color_jitter: float = 0.4
    jitter_prob: float = 0.5
    cutmix_prob: float = 1.0
    cutmix_beta: float = 0.25


@dataclass
class DistillSettings:
    """The ``distill`` group: a synthesizer, its parameters and the KD loop's budgets
    (Algorithm 1's outer loop: ``iterations`` generator steps, ``student_steps`` KD steps each)."""

    synthesizer: str = "zskt"
    synthesizer_params: Any = None
    iterations: int = 500
    """Generator steps (pseudo-batches); the student takes ``student_steps`` per iteration."""
    student_steps: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 1.0
    clip_grad_norm: Optional[float] = None
    """Clip the student's gradient norm to this (None = off; not during SR, as the reference)."""
    kl_reduction: str = "sum"
    """KD's KL over classes: ``sum`` (per-sample KL) | ``mean`` (a batch x class mean, the reference ZSKT)."""
    attention_beta: float = 0.0
    """ZSKT's attention transfer: student loss + beta * AT (ZSKT uses 250; 0 = off)."""
    generator_width: Optional[int] = None
    """Width (``ngf``) of the synthesizer's generator (zskt, dense, cmi); None = 64, the
    reference's. Ignored by a synthesizer without a generator (ood), so a preset that sizes
    the generator (``experiment=mnist_central``: 32) composes with every synthesizer."""
    ensemble: str = DEFAULT_ENSEMBLE
    """How the client teachers are combined (FL; one teacher gives the same targets under every
    rule): ``mean_probs`` (the default: the mean of the teachers' probabilities, chosen from
    the ensemble comparison in docs/configuration.md, issue 15) | ``mean_logits`` (FedDF / DENSE: the mean of
    raw logits, the default before) |
    ``standardized_logits`` | ``median_probs`` | ``trimmed_probs`` (``abd_fl/distill/ensemble.py``)."""
    ensemble_trim: float = 0.2
    """``trimmed_probs``: the share of teachers dropped at each end per class, in [0, 0.5)."""
    ensemble_report: bool = False
    """Also evaluate the round's teacher ensemble under every rule (``ensembles`` in
    ``metrics.jsonl``; report only, the distillation uses ``ensemble``): compares the rules on
    the same teachers in one run (``benchmarks/ensemble_rules.py``)."""
    ensemble_vectorize: str = "off"
    """Run the client teachers (one architecture) as one ``vmap``-ed call: ``off`` (measured
    faster on CPU) | ``on`` | ``auto`` (on CUDA only; not yet timed on a GPU); the same
    logits either way."""
    memory_format: str = "auto"
    """Layout of the 4-D weights (and so the feature maps) during the distillation:
    ``channels_last`` | ``contiguous`` | ``auto`` (channels_last on CPU, where it ran the default
    distillation 1.2-1.6x faster; contiguous on CUDA, not timed there). Each pass gives the
    same values to float precision (another convolution algorithm sums in another order); over
    a whole run those last-bit differences grow, as between two machines, so a run's figures
    are reproducible for one layout, not across layouts."""

    def loop_config(self, seed: int) -> DistillConfig:
        """The distillation loop's settings (validated) for a run seeded with ``seed``."""
        return DistillConfig(
            iterations=self.iterations,
            student_steps=self.student_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            temperature=self.temperature,
            seed=seed,
            attention_beta=self.attention_beta,
            clip_grad_norm=self.clip_grad_norm,
            kl_reduction=self.kl_reduction,
            ensemble=self.ensemble,
            ensemble_trim=self.ensemble_trim,
            ensemble_vectorize=self.ensemble_vectorize,
            memory_format=self.memory_format,
        )

    def params_dict(self) -> dict[str, Any]:
        """The synthesizer's keyword arguments."""
        params = self.synthesizer_params
        if params is None:
            return {}
        return asdict(params) if hasattr(params, "__dataclass_fields__") else dict(params)

    def build_synthesizer(self) -> Synthesizer:
        """A fresh synthesizer (raises ``ValueError`` naming a bad parameter)."""
        params = self.params_dict()
        if self.generator_width is not None and self.synthesizer in GENERATOR_SYNTHESIZERS:
            params["ngf"] = self.generator_width
        return build_synthesizer(self.synthesizer, **params)


@dataclass
class ZSKT(DistillSettings):
    """ZSKT (Micaelli & Storkey, 2019) at the ABD reference's settings: the student's KD KL
    as a batch x class mean, gradient norms clipped to 5 (``zskt/solver.py``)."""

    synthesizer: str = "zskt"
    synthesizer_params: ZSKTParams = field(default_factory=ZSKTParams)
    iterations: int = 500
    student_steps: int = 10
    temperature: float = 1.0
    clip_grad_norm: Optional[float] = 5.0
    kl_reduction: str = "mean"


@dataclass
class DENSE(DistillSettings):
    """DENSE (Zhang et al., NeurIPS 2022): a generator with a sample pool, KD at temperature 4."""

    synthesizer: str = "dense"
    synthesizer_params: DENSEParams = field(default_factory=DENSEParams)
    iterations: int = 150
    student_steps: int = 5
    temperature: float = 4.0


@dataclass
class CMI(DistillSettings):
    """CMI (Fang et al., IJCAI 2021): contrastive model inversion with an image pool."""

    synthesizer: str = "cmi"
    synthesizer_params: CMIParams = field(default_factory=CMIParams)
    iterations: int = 200
    student_steps: int = 5
    temperature: float = 4.0


@dataclass
class OOD(DistillSettings):
    """KD on out-of-distribution patches of one photo (Asano & Saeed, 2021)."""

    synthesizer: str = "ood"
    synthesizer_params: OODParams = field(default_factory=OODParams)
    iterations: int = 500
    student_steps: int = 10
    temperature: float = 4.0


DISTILL_PRESETS: dict[str, type[DistillSettings]] = {cls.synthesizer: cls for cls in (ZSKT, DENSE, CMI, OOD)}
"""``distill=<name>``: the settings class of each shipped group file."""


def distill_settings(group: Mapping[str, Any]) -> DistillSettings:
    """The typed settings of a composed ``distill`` group (a plain dict, e.g. a run's
    ``config.yaml``): its synthesizer's class with the dict's values. Raises ``ValueError``
    on an unknown synthesizer or key."""
    name = group.get("synthesizer")
    if name not in DISTILL_PRESETS:
        raise ValueError(f"unknown synthesizer '{name}'; choose one of: {', '.join(DISTILL_PRESETS)}")
    cls = DISTILL_PRESETS[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(group) - known)
    if unknown:
        raise ValueError(f"unknown distill key(s) {unknown}; known: {', '.join(sorted(known))}")
    values = dict(group)
    params_cls = type(cls().synthesizer_params)
    raw = dict(values.pop("synthesizer_params", None) or {})
    param_names = {f.name for f in fields(params_cls)}
    bad = sorted(set(raw) - param_names)
    if bad:
        raise ValueError(f"unknown distill.synthesizer_params key(s) {bad} for synthesizer '{name}'; known: {', '.join(sorted(param_names))}")
    return cls(**values, synthesizer_params=params_cls(**raw))
