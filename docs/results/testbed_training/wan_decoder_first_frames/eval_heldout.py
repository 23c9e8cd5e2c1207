import numpy as np, torch, collections, sys, json, cv2
torch.set_num_threads(2)
from diffusers import AutoencoderKLWan
import diffusion_accel.pipelines.testbed.video_data as vd
from diffusion_accel.pipelines.testbed.shapes_net import detect
from diffusion_accel.pipelines.testbed.video_judge import judge_clips, video_scores
from diffusion_accel.pipelines.testbed.train_wan import clips_to_tensor, tensor_to_clips
frames, clips = vd.make_clips(vd.SPLIT_HELDOUT, 0, 64)
out, pics = {}, [np.concatenate(list(frames[:8, 0]), 1)]
for path in sys.argv[1:]:
    vae = AutoencoderKLWan.from_pretrained(path).eval()
    with torch.no_grad():
        f0 = tensor_to_clips(vae.decode(vae.encode(clips_to_tensor(frames[:, :1])).latent_dist.mode()).sample)
        full = tensor_to_clips(vae.decode(vae.encode(clips_to_tensor(frames)).latent_dist.mode()).sample)
    det = detect(f0[:, 0])
    sh = [d[0].shape if d else None for d in det]; acc = float(np.mean([s == c.shape for s, c in zip(sh, clips)]))
    conf = collections.Counter((c.shape, s) for s, c in zip(sh, clips))
    psnr0 = float(np.mean(10 * np.log10(255 ** 2 / np.maximum(((f0.astype(float) - frames[:, :1]) ** 2).mean((1, 2, 3, 4)), 1e-10))))
    out[path] = {"first_frame_shape": acc, "first_frame_psnr": psnr0, "confusion": {f"{a}->{b}": n for (a, b), n in conf.items()},
                 "full_clips": video_scores(judge_clips(full, [c.caption for c in clips]))}
    print(path, json.dumps(out[path]))
    pics.append(np.concatenate(list(f0[:8, 0]), 1))
json.dump(out, open("/tmp/eval_f0.json", "w"), indent=2)
cv2.imwrite("/tmp/f0.png", cv2.resize(np.concatenate(pics, 0), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)[:, :, ::-1])
