from .student_cnn import StudentEmbeddingNet, build_student
from .soft_kmeans import SoftKMeansHead, kmeans_fit
from .recon_decoder import TinyReconDecoder
from .distill_head import DistillHead

__all__ = ["StudentEmbeddingNet", "build_student", "SoftKMeansHead", "kmeans_fit", "TinyReconDecoder", "DistillHead"]
