"""What the denoiser and the losses are fed, built as the family's pipeline builds it.

:mod:`.flux` (the FLUX.1 transformer's inputs), :mod:`.flow_matching` (timesteps, noise, x_t),
:mod:`.latents` (VAE latents sampled per step), :mod:`.embeddings` (image embeddings for the
embedding losses) and :mod:`.caching` (precomputed tensors served instead of the encoders).
"""
