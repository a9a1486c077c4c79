"""abd-quickstart: a stock Flower app whose ServerApp wraps FedAvg in DataFreeKD with ABD."""
