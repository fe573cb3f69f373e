# hcgen on Debian 12: the same install step as the README (scripts/bootstrap.sh), Caffe built in a layer.
#   docker build -t hcgen .
#   docker run --rm -v "$PWD/results:/results" -v /path/to/mnist:/data/mnist hcgen
FROM debian:bookworm
WORKDIR /opt/hcgen
COPY scripts/ scripts/
RUN bash scripts/apt_install.sh && rm -rf /var/lib/apt/lists/*
COPY . .
ENV HCGEN_CACHE=/opt/hcgen-cache
RUN bash scripts/bootstrap.sh setup && rm -rf /root/.cache/pip
ENV PATH=/opt/hcgen/.venv/bin:$PATH \
    HCGEN_MNIST_DIR=/data/mnist \
    HCGEN_RESULTS=/results
VOLUME ["/results", "/data/mnist"]
CMD ["make", "demo"]
