"""The autoencoder, the latent UNet and its conditioning, schedulers, samplers, metrics. Pure torch/MONAI."""
