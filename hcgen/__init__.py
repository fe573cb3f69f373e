"""hcgen: adversarial diversity and hard positive generation (Rozsa, Rudd, Boult, CVPRW 2016) on Caffe.

Public API (none of it imports Caffe; `hcgen.backends.caffe.CaffeNet` does):

- PASS (Eq. 1-4): `pass_score`, `pass_scores`, `ssim`, `align_ecc`, `perturbation_norms`
- directions (Eq. 6-7): `fgs`, `fgv`, `omega_hc`, `hot_class`, `hc_d`, `hc_s`
- search (Sec. 4.3): `adversarial_search`, `hard_positives`, `perturb`

The packages, and which may import which, are listed in README.md ("Architecture").
"""

from hcgen import _deprecated
from hcgen.core.directions import fgs, fgv, hc_d, hc_s, hot_class, omega_hc
from hcgen.core.metrics import align_ecc, pass_score, pass_scores, perturbation_norms, ssim
from hcgen.core.search import adversarial_search, hard_positives, perturb

__version__ = "0.1.0"
__all__ = [
    "pass_score", "pass_scores", "ssim", "align_ecc", "perturbation_norms",
    "fgs", "fgv", "omega_hc", "hot_class", "hc_d", "hc_s",
    "adversarial_search", "hard_positives", "perturb",
]

_deprecated.install()  # hcgen.caffe_net, hcgen.search, ... (the paths before the subpackages) for one release
