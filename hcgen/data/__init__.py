"""Data on disk: Caffe Datum LMDBs, the generation folder, source images (MNIST, LMDB, image folders), InfiMNIST-style deformations, shuffled mixes, the PyTorch dataset."""
