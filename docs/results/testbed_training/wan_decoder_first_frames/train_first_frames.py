# Diagnostic: the shipped 8x decoder trained on first frames only (9x cheaper per sample): does it learn to draw shapes
# given many more samples? Plain L1 + L2 decoder-only stage, encoder frozen.
import dataclasses, torch
torch.set_num_threads(2)
from diffusion_accel.pipelines.testbed import video_data, train_wan
_make = video_data.make_clip
video_data.make_clip = lambda split, index: dataclasses.replace(_make(split, index), frames=_make(split, index).frames[:1])
m = train_wan.train_wan_vae("/work/runs/gan/vae_f0", seed=0, minutes=35, steps=10**6, batch_size=32, lr=1e-3,
                            init_from="/work/main/assets/testbed-wan/vae", decoder_only=True)
