"""Training: MusicGen LM and diffusion UNet fine-tuning, LoRA, beat-synchronous mixup, torchrun scale-out.

    data.py         captioned audio folders, encoded once and cached; batches as a function of the step
    losses.py       MusicGen's delayed-code cross-entropy, the diffusion targets and loss
    loop.py         AdamW, warm-up + cosine, accumulation, clipping, bf16 autocast, exact-resume checkpoints
    musicgen.py     the MusicGen objective and run
    diffusion.py    the diffusion UNet objective, cached VAE latents, and run
    lora.py         LoRA adapters on the attention projections
    distributed.py  DDP / FSDP under torchrun
    beats.py        an onset-based beat tracker
    mixup.py        MusicLDM's beat-synchronous audio and latent mixup
"""
