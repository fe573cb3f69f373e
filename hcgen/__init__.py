"""hcgen: adversarial diversity and hard positive generation (Rozsa, Rudd, Boult, CVPRW 2016) on Caffe.

Public API (none of it imports Caffe; `hcgen.caffe_net.CaffeNet` does):

- PASS (Eq. 1-4): `pass_score`, `pass_scores`, `ssim`, `align_ecc`, `perturbation_norms`
- directions (Eq. 6-7): `fgs`, `fgv`, `omega_hc`, `hot_class`, `hc_d`, `hc_s`
- search (Sec. 4.3): `adversarial_search`, `hard_positives`, `perturb`
"""
from hcgen.directions import fgs, fgv, hc_d, hc_s, hot_class, omega_hc
from hcgen.metrics import align_ecc, pass_score, pass_scores, perturbation_norms, ssim
from hcgen.search import adversarial_search, hard_positives, perturb

__version__ = "0.1.0"
__all__ = [
    "pass_score", "pass_scores", "ssim", "align_ecc", "perturbation_norms",
    "fgs", "fgv", "omega_hc", "hot_class", "hc_d", "hc_s",
    "adversarial_search", "hard_positives", "perturb",
]
