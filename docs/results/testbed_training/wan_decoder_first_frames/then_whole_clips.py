import torch
torch.set_num_threads(1)
from diffusion_accel.pipelines.testbed import train_wan
m = train_wan.train_wan_vae("/work/runs/gan/vae_f0full", seed=0, minutes=13, steps=10**6, batch_size=8, lr=3e-4,
                            init_from="/work/runs/gan/vae_f0", decoder_only=True)
