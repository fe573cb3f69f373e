"""Training with the stock `caffe train` (driver, log parsing, solver rendering) and top-1 evaluation."""
