# hcgen on Debian 12, installed by the README's own step (`bash scripts/bootstrap.sh setup`); see the
# README's "Docker" section. Checked by scripts/docker_test.sh.
#   docker build -t hcgen .
#   docker run --rm -v "$PWD/results:/results" -v /path/to/mnist:/data/mnist hcgen
#
# Three layers, so that editing hcgen's code or tests does not rebuild Caffe:
#   1. the Debian packages of scripts/debian-packages.txt (scripts/apt_install.sh, as bootstrap.sh runs it);
#   2. bootstrap.sh setup given only the files it reads (setup.py, Makefile, the install scripts, patches/,
#      and hcgen/__init__.py so that pip's editable install finds the package): the virtualenv and the
#      Caffe build (~10 minutes on 2 cores) into $HCGEN_CACHE;
#   3. the whole tree, then bootstrap.sh setup again: seconds (venv current, Caffe cache key unchanged).
# No torch: the default job (CMD make demo) never imports it, so setup installs hcgen without the torch extra;
# `make test` installs the test extras (pytest, torch==2.13.0) on demand when it runs (README, "Docker": pass
# -e PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU-only wheel instead of PyPI's CUDA one).
# The compilers and -dev packages stay: `make demo` / `make test` check the package list on every run
# (scripts/apt_install.sh) and would reinstall them, and they let the image rebuild Caffe.
FROM debian:bookworm
WORKDIR /opt/hcgen
ENV HCGEN_CACHE=/opt/hcgen-cache

COPY scripts/apt_install.sh scripts/debian-packages.txt scripts/
RUN bash scripts/apt_install.sh && apt-get clean && rm -rf /var/lib/apt/lists/*

COPY setup.py Makefile ./
COPY scripts/bootstrap.sh scripts/install_caffe.sh scripts/
COPY patches/ patches/
COPY hcgen/__init__.py hcgen/
RUN bash scripts/bootstrap.sh setup && rm -rf /root/.cache/pip "$HCGEN_CACHE"/*.tar.gz

COPY . .
RUN bash scripts/bootstrap.sh setup && rm -rf /root/.cache/pip "$HCGEN_CACHE"/*.tar.gz

# Data in, results out (README, "Docker"): MNIST mounted at /data/mnist, results at /results. The tests
# read MNIST from ../shared/data/mnist beside the repository: the same mount, through a link.
RUN mkdir -p /data/mnist /opt/shared/data && ln -s /data/mnist /opt/shared/data/mnist
ENV PATH=/opt/hcgen/.venv/bin:$PATH \
    HCGEN_MNIST_DIR=/data/mnist \
    HCGEN_RESULTS=/results
CMD ["make", "demo"]
