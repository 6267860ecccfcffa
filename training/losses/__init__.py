from .clustering import edge_aware_tv, marginal_entropy_gap, pixel_entropy, pseudo_label_ce
from .consistency import symmetric_kl, two_view_consistency
from .merge import EMANormalizer, scale_neutral_merge
from .recon import recon_loss

__all__ = ["edge_aware_tv", "marginal_entropy_gap", "pixel_entropy", "pseudo_label_ce", "symmetric_kl",
           "two_view_consistency", "EMANormalizer", "scale_neutral_merge", "recon_loss"]
