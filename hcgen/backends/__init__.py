"""Networks seen in pixel units: the `Backend` contract and its shared loops (base), Caffe (caffe, caffe_checks, pycaffe), PyTorch (torch), and the factory that opens one from a spec."""
