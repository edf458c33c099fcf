"""Data: the analytic Gaussian-mixture teacher, the embedded digits, and the EDM/EDM2 dataset formats (images, and
VAE latents as .npy moments)."""
from engine.data.dataset_writer import write_image_dataset, write_latent_dataset
from engine.data.digits import DIGITS_COUNT, DIGITS_NUM_CLASSES, digits, digits_source, digits_uint8
from engine.data.gaussian_mixture import GaussianMixture
from engine.data.image_dataset import (LABELS_FILENAME, DatasetError, ImageDataset, edm_image_name, edm_latent_name,
                                       float_to_uint8, uint8_to_float)

__all__ = ["GaussianMixture", "digits", "digits_source", "digits_uint8", "DIGITS_COUNT", "DIGITS_NUM_CLASSES", "ImageDataset",
           "DatasetError", "write_image_dataset", "uint8_to_float", "float_to_uint8", "edm_image_name",
           "LABELS_FILENAME", "write_latent_dataset", "edm_latent_name"]
