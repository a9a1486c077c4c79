"""Backdoor attacks: pixel-space triggers and data poisoning (torch-only)."""

from abd_fl.attacks.poison import make_poisoned_test_set, poison_data
from abd_fl.attacks.triggers import TRIGGERS, Trigger, build_trigger, trigger_names

__all__ = ["Trigger", "TRIGGERS", "build_trigger", "trigger_names", "poison_data", "make_poisoned_test_set"]
