#!/usr/bin/env python3
"""Train `tiny-shapes`: a small text-to-image latent diffusion model, from scratch.

It uses exactly the Stable Diffusion 1.x architectures (diffusers AutoencoderKL and
UNet2DConditionModel, transformers CLIPTextModel with the real CLIP BPE tokenizer),
only much smaller, so it runs through the same code path as SD 1.5.

Data is procedural (no download): 64x64 RGB images of one shape (circle, square,
triangle) of one of 8 colours on a plain background of another colour, small or
large, at one of 5 positions, with light noise and jitter. Captions are built from
templates with attributes randomly dropped, plus ~10% empty captions (for CFG).

Stages (as in the LDM paper):
  1. train the autoencoder (f=4, 4 latent channels, L1+L2 + small KL), freeze it;
     scaling_factor = 1/std of the latents; encode the dataset once;
  2. train the U-Net (epsilon prediction, SD's scaled_linear schedule) jointly with
     the text encoder; EMA of both is what gets saved;
  3. (--decoder-only, separate process) fine-tune only the VAE decoder, as
     sd-vae-ft-mse did: the encoder, hence the latent space, is unchanged.
  4. (--init-from, issue #20) continue stage 2 from saved weights, from a cache of the
     latents; --prediction-type v_prediction --zero-snr turns the model into a
     zero-terminal-SNR v-prediction model (arXiv 2305.08891) saved with a DDIM
     scheduler (trailing spacing), which is what the shipped weights are now.

Everything runs on CPU with one thread and is deterministic given --seed. The
shipped weights were made with (see weights/tiny-shapes/README.md):

    HF_HUB_OFFLINE=1 python tools/train_tiny.py --out weights/tiny-shapes
    # decoder fine-tune, three rounds, each from the previous round's VAE:
    HF_HUB_OFFLINE=1 python tools/train_tiny.py --decoder-only --vae-from <VAE> --out <DIR> \
        --log weights/tiny-shapes/train_log.txt --dec-steps 1500 --vae-batch 8 --dec-lr <1e-3|4e-4|3e-4>
"""
import argparse
import copy
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- data

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 16.0, "large": 32.0}  # nominal width in pixels (1/4 and 1/2 of 64)
SIZE_NAMES = list(SIZES)
POSITIONS = {  # centre (x, y) in pixels, phrase
    "left": ((18.0, 32.0), "on the left"),
    "right": ((46.0, 32.0), "on the right"),
    "top": ((32.0, 18.0), "at the top"),
    "bottom": ((32.0, 46.0), "at the bottom"),
    "center": ((32.0, 32.0), "in the center"),
}
POSITION_NAMES = list(POSITIONS)
RES = 64
SS = 4  # supersampling factor for anti-aliased edges


def shape_mask(shape, cx, cy, w, grid):
    """Coverage (0..1) of `shape` with centre (cx, cy) and width w on a RES x RES image."""
    ys, xs = grid
    if shape == "circle":
        m = (xs - cx) ** 2 + (ys - cy) ** 2 <= (w / 2) ** 2
    elif shape == "square":
        m = (np.abs(xs - cx) <= w / 2) & (np.abs(ys - cy) <= w / 2)
    else:  # upward-pointing isosceles triangle, width w, height ~0.9 w
        h = 0.9 * w
        top = cy - h / 2
        bot = cy + h / 2
        t = (ys - top) / h  # 0 at apex, 1 at base
        m = (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * w / 2)
    m = m.astype(np.float32).reshape(RES, SS, RES, SS).mean(axis=(1, 3))
    return m


def make_dataset(n, seed):
    """Deterministic procedural dataset. Returns uint8 images [n,64,64,3] and attribute rows."""
    rng = np.random.RandomState(seed)
    c = (np.arange(RES * SS, dtype=np.float32) + 0.5) / SS
    grid = np.meshgrid(c, c, indexing="ij")
    imgs = np.empty((n, RES, RES, 3), dtype=np.uint8)
    attrs = np.empty((n, 5), dtype=np.int64)  # shape, colour, bg, size, pos
    for i in range(n):
        s = rng.randint(len(SHAPES))
        col = rng.randint(len(COLOUR_NAMES))
        bg = rng.randint(len(COLOUR_NAMES) - 1)
        if bg >= col:
            bg += 1
        sz = rng.randint(len(SIZE_NAMES))
        pos = rng.randint(len(POSITION_NAMES))
        (px, py), _ = POSITIONS[POSITION_NAMES[pos]]
        w = SIZES[SIZE_NAMES[sz]] * rng.uniform(0.9, 1.1)
        cx = px + rng.uniform(-2.5, 2.5)
        cy = py + rng.uniform(-2.5, 2.5)
        m = shape_mask(SHAPES[s], cx, cy, w, grid)[..., None]
        fg = np.array(COLOURS[COLOUR_NAMES[col]], np.float32)
        bgc = np.array(COLOURS[COLOUR_NAMES[bg]], np.float32)
        img = m * fg + (1 - m) * bgc
        img = img + rng.normal(0, 4.0, size=img.shape)  # light pixel noise
        imgs[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
        attrs[i] = (s, col, bg, sz, pos)
    return imgs, attrs


def caption(a, rng, p_empty=0.1, p_drop=0.35, p_drop_position=None):
    """Caption for attribute row a; attributes randomly dropped (the position phrase with
    p_drop_position when given, else p_drop); ~p_empty empty captions."""
    if p_drop_position is None:
        p_drop_position = p_drop
    if rng.rand() < p_empty:
        return ""
    s, col, bg, sz, pos = (int(v) for v in a)
    words = ["a"]
    if rng.rand() >= p_drop:
        words.append(SIZE_NAMES[sz])
    if rng.rand() >= p_drop:
        words.append(COLOUR_NAMES[col])
    words.append(SHAPES[s])
    if rng.rand() >= p_drop_position:
        words.append(POSITIONS[POSITION_NAMES[pos]][1])
    if rng.rand() >= p_drop:
        words.append("on a %s background" % COLOUR_NAMES[bg])
    return " ".join(words)


# ------------------------------------------------------------------------ tokenizer


def build_clip_tokenizer_files(dst):
    """Write vocab.json/merges.txt/... exactly as CLIP's SimpleTokenizer builds its vocab."""
    import open_clip

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_unicode = [chr(c) for c in cs]
    vocab = byte_unicode + [v + "</w>" for v in byte_unicode]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "vocab.json"), "w") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(dst, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f, indent=2)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "errors": "replace", "add_prefix_space": False}, f, indent=2)


def load_tokenizer(out_dir, log):
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(out_dir, "tokenizer")
    need = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
    if all(os.path.exists(os.path.join(tok_dir, f)) for f in need):
        log("tokenizer: using %s" % tok_dir)
        return CLIPTokenizer.from_pretrained(tok_dir), tok_dir, False
    tmp = tempfile.mkdtemp(prefix="clip_tok_")
    build_clip_tokenizer_files(tmp)
    log("tokenizer: %s missing, built one in %s" % (tok_dir, tmp))
    return CLIPTokenizer.from_pretrained(tmp), tmp, True


# --------------------------------------------------------------------------- models


def make_vae(a):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=RES,
        scaling_factor=1.0,  # replaced by 1/std of the latents after training
    )


def make_text_encoder(a):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=a.text_dim,
        intermediate_size=a.text_dim * 4,
        projection_dim=a.text_dim,
        num_hidden_layers=a.text_layers,
        num_attention_heads=a.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def make_unet(a):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(a.unet_channels),
        layers_per_block=1,
        cross_attention_dim=a.text_dim,
        attention_head_dim=a.unet_heads,  # SD 1.x convention: really the number of heads
        norm_num_groups=32,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        use_linear_projection=False,
    )


def nparams(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------ schedules


def lr_at(step, total, peak, warmup, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


class EMA:
    def __init__(self, models, decay):
        self.decay = decay
        self.params = [p for m in models for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self):
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


# ---------------------------------------------------------------------------- stages


def to_tensor(imgs_u8):
    return torch.from_numpy(imgs_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, imgs, a, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.RandomState(a.seed + 1)
    n = len(imgs)
    t0 = time.time()
    run = None
    vae.train()
    for step in range(a.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.vae_steps, a.vae_lr, 100, floor=0.05)
        idx = rng.randint(0, n, size=a.vae_batch)
        x = to_tensor(imgs[idx])
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        # KL summed over latent elements, relative to the per-pixel recon sum (LDM's 1e-6 weighting)
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + l2 + a.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        v = torch.tensor([l1.item(), l2.item(), post.kl().mean().item()])
        run = v if run is None else 0.98 * run + 0.02 * v
        if step % a.log_every == 0 or step == a.vae_steps - 1:
            log("vae step %5d/%d  l1 %.5f  l2 %.6f  kl %.1f  (ema l1 %.5f l2 %.6f)  lr %.2e  %.1fs"
                % (step, a.vae_steps, l1.item(), l2.item(), v[2].item(), run[0].item(), run[1].item(),
                   opt.param_groups[0]["lr"], time.time() - t0))
    vae.eval()
    return {"l1": run[0].item(), "l2": run[1].item(), "kl": run[2].item()}


def finetune_decoder(vae, imgs, a, log):
    """Stage 3 (as in sd-vae-ft-mse): fine-tune only the decoder (and post_quant_conv) on posterior
    samples. The encoder, hence the latent space the U-Net was trained on, is unchanged."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.dec_lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.RandomState(a.seed + 7)
    gen = torch.Generator().manual_seed(a.seed + 8)
    n = len(imgs)
    t0 = time.time()
    run = None
    vae.decoder.train()
    for step in range(a.dec_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.dec_steps, a.dec_lr, 50, floor=0.05)
        idx = rng.randint(0, n, size=a.vae_batch)
        x = to_tensor(imgs[idx])
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        loss = l1 + l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        v = torch.tensor([l1.item(), l2.item()])
        run = v if run is None else 0.98 * run + 0.02 * v
        if step % a.log_every == 0 or step == a.dec_steps - 1:
            log("decoder-ft step %5d/%d  l1 %.5f  l2 %.6f  (ema l1 %.5f l2 %.6f)  lr %.2e  %.1fs"
                % (step, a.dec_steps, l1.item(), l2.item(), run[0].item(), run[1].item(),
                   opt.param_groups[0]["lr"], time.time() - t0))
    vae.eval()
    vae.requires_grad_(False)
    return {"l1": run[0].item(), "l2": run[1].item()}


@torch.no_grad()
def vae_heldout(vae, val_imgs):
    xv = to_tensor(val_imgs)
    rv = torch.cat([vae.decode(vae.encode(xv[i:i + 64]).latent_dist.mean).sample for i in range(0, len(xv), 64)])
    mx = [0.0]
    hooks = [m.register_forward_hook(lambda m, i, o: mx.__setitem__(0, max(mx[0], o.abs().max().item())))
             for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    vae.decode(vae.encode(xv[:32]).latent_dist.mean)
    for h in hooks:
        h.remove()
    return {"l1": (rv - xv).abs().mean().item(), "l2": ((rv - xv) ** 2).mean().item(), "max_decoder_activation": mx[0]}


@torch.no_grad()
def encode_all(vae, imgs, bs=128):
    means, stds = [], []
    for i in range(0, len(imgs), bs):
        post = vae.encode(to_tensor(imgs[i : i + bs])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def save_all(a, out, vae, te, unet, tok_src, copy_tok, scaling, info):
    os.makedirs(out, exist_ok=True)
    v = copy.deepcopy(vae).to(torch.float16)
    v.register_to_config(scaling_factor=float(scaling), force_upcast=bool(a.force_upcast))
    v.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    copy.deepcopy(te).to(torch.float16).save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)
    copy.deepcopy(unet).to(torch.float16).save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    tok_dst = os.path.join(out, "tokenizer")
    if copy_tok and os.path.abspath(tok_src) != os.path.abspath(tok_dst):
        if not os.path.exists(os.path.join(tok_dst, "vocab.json")):
            shutil.copytree(tok_src, tok_dst, dirs_exist_ok=True)
    # scheduler_config.json exactly as in SD 1.5 (runwayml/stable-diffusion-v1-5), or for a
    # zero-terminal-SNR v-prediction model the paper's sampler: DDIM with trailing spacing
    import diffusers

    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    sc = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": diffusers.__version__,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    if a.zero_snr:
        del sc["skip_prk_steps"]  # a PNDM key
        sc.update(_class_name="DDIMScheduler", prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing")
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sc, f, indent=2, sort_keys=True)
        f.write("\n")
    mi = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", sc["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(mi, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


# ------------------------------------------------------- stage 2, continued (resumable)


def holdout_combos(path):
    """(shape, colour, bg, size, pos) index tuples of the full-attribute prompts in a JSON prompt
    set (tools/adherence.py prompts): training images with these combinations are left out, so the
    evaluation's full prompts are combinations the model never saw, in pixels or in words."""
    rows = json.load(open(path))
    out = set()
    for t in rows:
        if all(t.get(k) for k in ("shape", "colour", "background", "size", "position")):
            out.add((SHAPES.index(t["shape"]), COLOUR_NAMES.index(t["colour"]), COLOUR_NAMES.index(t["background"]),
                     SIZE_NAMES.index(t["size"]), POSITION_NAMES.index(t["position"])))
    return out


def latent_shape_mask(attr_rows):
    """[n, 1, 16, 16] float mask of each image's shape box in latent cells (f = 4): the nominal
    size and position from the attributes, widened by the generator's jitter (+-2.5 px, +-10%)."""
    n = len(attr_rows)
    m = torch.zeros(n, 1, RES // 4, RES // 4)
    c = (torch.arange(RES // 4, dtype=torch.float32) + 0.5) * 4.0  # cell centres in pixels
    for i, r in enumerate(attr_rows):
        _, _, _, sz, pos = (int(v) for v in r)
        (px, py), _ = POSITIONS[POSITION_NAMES[pos]]
        half = SIZES[SIZE_NAMES[sz]] * 0.55 + 2.5
        inx = ((c - px).abs() <= half + 2.0).float()
        iny = ((c - py).abs() <= half + 2.0).float()
        m[i, 0] = iny[:, None] * inx[None, :]
    return m


def sample_timesteps(n, gen, power, noisiest=0):
    """Uniform over 0..999 when power == 1; power > 1 favours high noise (density ~ t^(power-1)),
    where the layout and colours, hence the prompt, are decided. The last `noisiest` of the n are
    t = 999 (with --zero-snr: pure noise, where the prompt alone must place the shape)."""
    if power == 1.0:
        ts = torch.randint(0, 1000, (n,), generator=gen)
    else:
        u = torch.rand(n, generator=gen)
        ts = (u.pow(1.0 / power) * 1000).long().clamp_(0, 999)
    if noisiest:
        ts[n - noisiest:] = 999
    return ts


def stage2_continue(a, log, T0):
    """Stage 2 only, resumable: start from a trained diffusers folder (--init-from: its frozen VAE,
    text encoder and U-Net) or from the checkpoint (--ckpt, if it exists: U-Net, text encoder, EMA,
    optimizer, RNG states, step), train from cached latents (--latents), save a checkpoint every
    --ckpt-every-min minutes and every --save-every steps, and stop cleanly at --time-budget-min
    (checkpoint + EMA weights in --out); running the same command again continues where it stopped,
    and gives the same weights as one uninterrupted run."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = a.init_from
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae")).float().eval()
    vae.requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    te = CLIPTextModel.from_pretrained(os.path.join(src, "text_encoder")).float()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(src, "unet")).float()
    log("stage 2 (continued) from %s: unet %.2fM, text encoder %.2fM, scaling_factor %.5f"
        % (src, nparams(unet) / 1e6, nparams(te) / 1e6, scaling))

    # ---- latents, encoded once with the (unchanged) encoder and cached
    lat_path = a.latents or os.path.join(a.out, "latents.pt")
    if os.path.exists(lat_path):
        c = torch.load(lat_path)
        assert c["n_images"] == a.n_images and c["seed"] == a.seed, "latent cache is for another dataset"
        lat_mean, lat_std, attrs = c["mean"], c["std"], c["attrs"].numpy()
        log("latents: loaded %s (%d images)" % (lat_path, len(attrs)))
    else:
        t = time.time()
        imgs, attrs = make_dataset(a.n_images, a.seed)
        lat_mean, lat_std = encode_all(vae, imgs)
        os.makedirs(os.path.dirname(os.path.abspath(lat_path)), exist_ok=True)
        torch.save({"mean": lat_mean, "std": lat_std, "attrs": torch.from_numpy(attrs), "n_images": a.n_images, "seed": a.seed,
                    }, lat_path)
        del imgs
        log("latents: made %d images and encoded them in %.1fs -> %s" % (len(attrs), time.time() - t, lat_path))
    pool = np.arange(len(attrs))
    if a.holdout:
        ho = holdout_combos(a.holdout)
        keep = np.array([tuple(int(v) for v in r) not in ho for r in attrs])
        pool = pool[keep]
        log("holdout: %d combinations from %s, %d of %d images left out" % (len(ho), a.holdout, (~keep).sum(), len(attrs)))

    # --zero-snr: SD's betas rescaled to a zero terminal SNR (arXiv 2305.08891), which needs
    # v-prediction (epsilon is undefined where the sample is pure noise). Why: with SD's own betas
    # the noisiest training sample still holds sqrt(0.0047) = 6.8% of the image, and on a 16x16
    # latent a flat shape's place and colour can be read from that (d' ~ 3 for left vs right), so
    # the model learns to take them from the noise, and at inference the seed decides them.
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          rescale_betas_zero_snr=a.zero_snr, prediction_type=a.prediction_type)
    acp = sched.alphas_cumprod.float()
    snr = acp / (1 - acp)
    decay, no_decay = [], []
    for n_, p_ in unet.named_parameters():
        (no_decay if p_.ndim < 2 else decay).append(p_)
    opt = torch.optim.AdamW(
        [{"params": decay, "lr": a.lr, "weight_decay": 0.01, "peak": a.lr},
         {"params": no_decay, "lr": a.lr, "weight_decay": 0.0, "peak": a.lr},
         {"params": list(te.parameters()), "lr": a.te_lr, "weight_decay": 0.0, "peak": a.te_lr}],
        betas=(0.9, 0.99), eps=1e-8)
    ema = EMA([unet, te], a.ema)
    rng = np.random.RandomState(a.seed + 3)
    gen = torch.Generator().manual_seed(a.seed + 4)
    step0, run, spent = 0, None, 0.0
    ckpt = a.ckpt or os.path.join(a.out, "ckpt.pt")
    if os.path.exists(ckpt):
        c = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(c["unet"])
        te.load_state_dict(c["te"])
        opt.load_state_dict(c["opt"])
        with torch.no_grad():
            for s_, v_ in zip(ema.shadow, c["ema"]):
                s_.copy_(v_)
        rng.set_state(c["np_rng"])
        gen.set_state(c["torch_gen"])
        torch.set_rng_state(c["torch_rng"])
        step0, run, spent = c["step"], c["run"], c["seconds"]
        log("resumed from %s at step %d (%.1f min of training so far)" % (ckpt, step0, spent / 60))

    def save_ckpt(step):
        tmp = ckpt + ".tmp"
        torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                    "ema": [s_.clone() for s_ in ema.shadow], "np_rng": rng.get_state(),
                    "torch_gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                    "run": run, "seconds": spent + time.time() - t0, "args": vars(a)}, tmp)
        os.replace(tmp, ckpt)
        log("checkpoint at step %d -> %s" % (step, ckpt))

    def save_weights(step):
        backup = [p.detach().clone() for p in ema.params]
        ema.copy_to()
        info = {"seed": a.seed, "args": vars(a), "init_from": src, "steps_done": step,
                "scaling_factor": scaling,
                "unet_final_ema_mse": None if run is None else run[0].item(),
                "unet_final_ema_weighted_loss": None if run is None else run[1].item(),
                "stage2_seconds": spent + time.time() - t0}
        save_all(a, a.out, vae, te.eval(), unet.eval(), os.path.join(src, "tokenizer"), True, scaling, info)
        te.train(); unet.train()
        with torch.no_grad():
            for s_, p_ in zip(backup, ema.params):
                p_.copy_(s_)
        log("saved EMA weights at step %d to %s" % (step, a.out))

    tok_cache = {}

    def tokenize(caps):
        rows = []
        for c in caps:
            if c not in tok_cache:
                tok_cache[c] = tokenizer(c, padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids[0]
            rows.append(tok_cache[c])
        return torch.stack(rows)

    log("stage 2 (continued): steps %d..%d, batch %d, lr %.1e (te %.1e), warmup %d, cosine to %.0f%%, EMA %.4f, "
        "min-SNR %.1f, t-power %.2f, p-drop %.2f, p-empty %.2f, budget %.1f min"
        % (step0, a.steps, a.batch, a.lr, a.te_lr, a.warmup, 100 * a.lr_floor, a.ema, a.min_snr, a.t_power,
           a.p_drop, a.p_empty, a.time_budget_min))
    unet.train(); te.train()
    t0 = time.time()
    last_ckpt = t0
    step = step0
    while step < a.steps:
        if a.time_budget_min and time.time() - t0 > a.time_budget_min * 60:
            log("time budget of %.1f min reached at step %d" % (a.time_budget_min, step))
            break
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step, a.steps, g_["peak"], a.warmup, floor=a.lr_floor)
        idx = pool[rng.randint(0, len(pool), size=a.batch)]
        ids = tokenize([caption(attrs[i], rng, p_empty=a.p_empty, p_drop=a.p_drop,
                                p_drop_position=a.p_drop_position) for i in idx])
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        ts = sample_timesteps(a.batch, gen, a.t_power, a.pure_noise_per_batch)
        zt = sched.add_noise(z0, noise, ts)
        pred = unet(zt, ts, te(ids)[0]).sample
        target = sched.get_velocity(z0, noise, ts) if a.prediction_type == "v_prediction" else noise
        mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        if a.min_snr <= 0:
            w = torch.ones_like(mse)
        elif a.prediction_type == "v_prediction":
            # the v loss is (SNR + 1) times the x0 loss; weight x0 by min(SNR + 1, gamma) (min-SNR
            # with the SNR + 1 of v-prediction), so the pure-noise step keeps an x0 weight of 1
            # where min(SNR, gamma) would give it 0
            w = torch.clamp(a.min_snr / (snr[ts] + 1), max=1.0)
        else:
            w = torch.clamp(snr[ts], max=a.min_snr) / snr[ts]
        if a.high_noise_weight > 1:
            # x0-like weighting where the noise dominates (1/SNR, capped): the layout is decided
            # there, and the epsilon loss pays it only ~SNR times the error in the image
            w = w * torch.clamp(1.0 / snr[ts], min=1.0, max=a.high_noise_weight)
        if a.shape_weight > 0:
            # the shape's pixels (its nominal box, from the attributes) weigh 1 + shape_weight:
            # a shape in the wrong place or colour costs more than the background around it
            pix = 1.0 + a.shape_weight * latent_shape_mask(attrs[idx])
            mse = (((pred - target) ** 2).mean(dim=1, keepdim=True) * pix).mean(dim=(1, 2, 3)) / pix.mean(dim=(1, 2, 3))
        loss = (w * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        ema.update(step)
        v = torch.tensor([mse.mean().item(), loss.item()])
        run = v if run is None else 0.98 * run + 0.02 * v
        step += 1
        if step % a.log_every == 0 or step == a.steps:
            el = time.time() - t0
            log("unet step %5d/%d  mse %.4f  wloss %.4f  (ema mse %.4f wloss %.4f)  gnorm %.2f  lr %.2e  %.0fs  %.2fs/step"
                % (step, a.steps, v[0], v[1], run[0], run[1], gn.item(), opt.param_groups[0]["lr"], el,
                   el / (step - step0)))
        if a.save_every and step % a.save_every == 0:
            save_ckpt(step)
            save_weights(step)
            if a.keep_saves:
                keep = os.path.join(a.out, "step-%d" % step)
                shutil.rmtree(keep, ignore_errors=True)
                os.makedirs(keep)
                for part in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
                    shutil.copytree(os.path.join(a.out, part), os.path.join(keep, part))
                shutil.copy(os.path.join(a.out, "model_index.json"), keep)
            last_ckpt = time.time()
        elif a.ckpt_every_min and time.time() - last_ckpt > a.ckpt_every_min * 60:
            save_ckpt(step)
            last_ckpt = time.time()
    save_ckpt(step)
    save_weights(step)
    log("stage 2 (continued) stopped at step %d/%d after %.1f min (%.1f min in all runs of this checkpoint)"
        % (step, a.steps, (time.time() - t0) / 60, (spent + time.time() - t0) / 60))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="weights/tiny-shapes")
    p.add_argument("--log", default=None, help="log file (default: <out>/train_log.txt)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-images", type=int, default=12000)
    p.add_argument("--vae-steps", type=int, default=700)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--vae-from", default=None,
                   help="skip stage 1: load this trained AutoencoderKL folder (and its scaling_factor)")
    p.add_argument("--force-upcast", type=int, default=0)
    p.add_argument("--dec-steps", type=int, default=0, help="stage 3: decoder-only fine-tune steps")
    p.add_argument("--dec-lr", type=float, default=5e-4)
    p.add_argument("--decoder-only", action="store_true",
                   help="run only stage 3 on --vae-from and write the VAE to --out/vae")
    p.add_argument("--text-dim", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 128])
    p.add_argument("--unet-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--te-lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon",
                   help="stage 2 continued: the U-Net's target")
    p.add_argument("--zero-snr", action="store_true",
                   help="stage 2 continued: SD's betas rescaled to zero terminal SNR (needs v_prediction); "
                        "the saved scheduler is then DDIM, trailing spacing")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--bench", action="store_true", help="only time a few steps of each stage")
    # stage 2, continued and resumable (issue #20); none of these changes the default run above
    p.add_argument("--init-from", default=None,
                   help="run only stage 2, starting from this trained diffusers folder (its VAE stays frozen)")
    p.add_argument("--ckpt", default=None, help="resumable checkpoint (default <out>/ckpt.pt); resumed if it exists")
    p.add_argument("--latents", default=None, help="cache of the encoded dataset (default <out>/latents.pt)")
    p.add_argument("--time-budget-min", type=float, default=0, help="stop (checkpoint + weights) after this many minutes")
    p.add_argument("--ckpt-every-min", type=float, default=10)
    p.add_argument("--holdout", default=None,
                   help="JSON prompt set (tools/adherence.py prompts): leave out the images of its full-attribute combinations")
    p.add_argument("--t-power", type=float, default=1.0, help="timestep density ~ t^(power-1); 1 = uniform")
    p.add_argument("--pure-noise-per-batch", type=int, default=0,
                   help="samples of each batch trained at t = 999 (zero SNR: the prompt alone places the shape)")
    p.add_argument("--p-drop", type=float, default=0.35, help="per-attribute caption dropout")
    p.add_argument("--p-drop-position", type=float, default=None,
                   help="dropout of the position phrase (default: --p-drop)")
    p.add_argument("--high-noise-weight", type=float, default=1.0,
                   help="multiply the loss by clamp(1/SNR, 1, this): weight the high-noise steps like an x0 loss")
    p.add_argument("--shape-weight", type=float, default=0.0,
                   help="extra loss weight on the latent cells of the shape's nominal box")
    p.add_argument("--keep-saves", action="store_true",
                   help="also keep every --save-every save in <out>/step-N (to score each one)")
    p.add_argument("--p-empty", type=float, default=0.1, help="share of empty captions (for CFG)")
    p.add_argument("--lr-floor", type=float, default=0.1, help="the cosine ends at this fraction of the peak lr")
    a = p.parse_args()
    if a.zero_snr and a.prediction_type != "v_prediction":
        p.error("--zero-snr needs --prediction-type v_prediction (epsilon is undefined at zero SNR)")
    if (a.zero_snr or a.prediction_type != "epsilon") and not a.init_from:
        p.error("--prediction-type and --zero-snr apply to stage 2 continued (--init-from)")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.use_deterministic_algorithms(True)
    os.makedirs(a.out, exist_ok=True)
    log_path = a.log or os.path.join(a.out, "train_log.txt")
    logf = open(log_path, "a")

    def log(msg):
        line = "[%s] %s" % (time.strftime("%H:%M:%S"), msg)
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    T0 = time.time()
    log("command: %s" % " ".join([sys.executable] + sys.argv))
    log("args: %s" % json.dumps(vars(a)))
    log("torch %s threads %d" % (torch.__version__, torch.get_num_threads()))
    if a.init_from:
        stage2_continue(a, log, T0)
        return

    tokenizer, tok_src, copy_tok = load_tokenizer(a.out, log)
    vae, te, unet = make_vae(a), make_text_encoder(a), make_unet(a)
    log("params: vae %.2fM  text_encoder %.2fM  unet %.2fM" % (nparams(vae) / 1e6, nparams(te) / 1e6, nparams(unet) / 1e6))

    if a.bench:
        x = torch.randn(a.vae_batch, 3, 64, 64)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
        for i in range(4):
            t = time.time()
            post = vae.encode(x).latent_dist
            loss = (vae.decode(post.sample()).sample - x).abs().mean()
            opt.zero_grad(); loss.backward(); opt.step()
            log("bench vae step (batch %d): %.3fs" % (a.vae_batch, time.time() - t))
        t = time.time()
        with torch.no_grad():
            vae.encode(torch.randn(128, 3, 64, 64))
        log("bench encode 128: %.3fs" % (time.time() - t))
        opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), lr=1e-4)
        ids = tokenizer(["a large red circle on the left on a blue background"] * a.batch, padding="max_length",
                        max_length=77, truncation=True, return_tensors="pt").input_ids
        for i in range(4):
            t = time.time()
            enc = te(ids)[0]
            out = unet(torch.randn(a.batch, 4, 16, 16), torch.randint(0, 1000, (a.batch,)), enc).sample
            loss = out.pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            log("bench unet+te step (batch %d): %.3fs" % (a.batch, time.time() - t))
        return

    # ---- data
    t = time.time()
    imgs, attrs = make_dataset(a.n_images, a.seed)
    log("dataset: %d images in %.1fs" % (len(imgs), time.time() - t))

    if a.decoder_only:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(a.vae_from).float().eval()
        log("stage 3 only: decoder fine-tune of %s (%d steps, batch %d, lr %.1e)"
            % (a.vae_from, a.dec_steps, a.vae_batch, a.dec_lr))
        val_imgs, _ = make_dataset(256, a.seed + 999)
        log("before: held-out %s" % json.dumps(vae_heldout(vae, val_imgs)))
        dec = finetune_decoder(vae, imgs, a, log)
        hv = vae_heldout(vae, val_imgs)
        log("after: held-out %s; final train %s" % (json.dumps(hv), json.dumps(dec)))
        v = copy.deepcopy(vae).to(torch.float16)
        v.register_to_config(force_upcast=bool(a.force_upcast))
        v.save_pretrained(os.path.join(a.out, "vae"), safe_serialization=True)
        with open(os.path.join(a.out, "decoder_ft_info.json"), "w") as f:
            json.dump({"args": vars(a), "decoder_ft_final_train": dec, "heldout": hv,
                       "seconds": time.time() - T0}, f, indent=2)
        log("decoder fine-tune done in %.1fs, saved %s" % (time.time() - T0, os.path.join(a.out, "vae")))
        return

    # ---- stage 1: autoencoder
    if a.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(a.vae_from).float().eval()
        vae_final = {"loaded_from": a.vae_from}
        prev = os.path.join(a.vae_from, "..", "training_info.json")
        if os.path.exists(prev):
            vae_final = json.load(open(prev)).get("vae_final_train", vae_final)
        log("stage 1 skipped: VAE loaded from %s (scaling_factor %.5f)" % (a.vae_from, vae.config.scaling_factor))
    else:
        vae_final = train_vae(vae, imgs, a, log)
    vae.requires_grad_(False)
    t = time.time()
    lat_mean, lat_std = encode_all(vae, imgs)
    g = torch.Generator().manual_seed(a.seed + 2)
    z = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g)
    scaling = 1.0 / z.flatten().std().item()
    log("encoded %d images in %.1fs; latent mean %.4f std %.4f -> scaling_factor %.5f; posterior std mean %.2e"
        % (len(imgs), time.time() - t, z.mean().item(), z.std().item(), scaling, lat_std.mean().item()))
    if a.vae_from:
        scaling = float(vae.config.scaling_factor)
        log("keeping the loaded scaling_factor %.5f" % scaling)
    # recon check on held-out images
    val_imgs, _ = make_dataset(256, a.seed + 999)
    with torch.no_grad():
        xv = to_tensor(val_imgs)
        rv = vae.decode(vae.encode(xv).latent_dist.mean).sample
        vae_val = {"l1": (rv - xv).abs().mean().item(), "l2": ((rv - xv) ** 2).mean().item()}
        # largest decoder activation, to decide whether fp16 is safe
        mx = [0.0]
        hooks = [m.register_forward_hook(lambda m, i, o: mx.__setitem__(0, max(mx[0], o.abs().max().item())))
                 for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        vae.decode(vae.encode(xv[:32]).latent_dist.mean)
        for h in hooks:
            h.remove()
    log("vae held-out recon l1 %.5f l2 %.6f (pixels in [-1,1]); max |conv activation| in decoder %.1f"
        % (vae_val["l1"], vae_val["l2"], mx[0]))

    # ---- stage 2: unet + text encoder, jointly
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    acp = sched.alphas_cumprod.float()
    snr = acp / (1 - acp)

    unet.train(); te.train()
    decay, no_decay = [], []
    for n_, p_ in unet.named_parameters():
        (no_decay if p_.ndim < 2 else decay).append(p_)
    opt = torch.optim.AdamW(
        [{"params": decay, "lr": a.lr, "weight_decay": 0.01, "peak": a.lr},
         {"params": no_decay, "lr": a.lr, "weight_decay": 0.0, "peak": a.lr},
         {"params": list(te.parameters()), "lr": a.te_lr, "weight_decay": 0.0, "peak": a.te_lr}],
        betas=(0.9, 0.99), eps=1e-8)
    ema = EMA([unet, te], a.ema)
    rng = np.random.RandomState(a.seed + 3)
    gen = torch.Generator().manual_seed(a.seed + 4)
    tok_cache = {}

    def tokenize(caps):
        rows = []
        for c in caps:
            if c not in tok_cache:
                tok_cache[c] = tokenizer(c, padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids[0]
            rows.append(tok_cache[c])
        return torch.stack(rows)

    log("stage 2: %d steps, batch %d, lr %.1e (te %.1e), warmup %d, cosine to 10%%, EMA %.4f, min-SNR %.1f"
        % (a.steps, a.batch, a.lr, a.te_lr, a.warmup, a.ema, a.min_snr))
    t0 = time.time()
    run = None
    info = {}
    for step in range(a.steps):
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step, a.steps, g_["peak"], a.warmup)
        idx = rng.randint(0, a.n_images, size=a.batch)
        caps = [caption(attrs[i], rng, p_empty=a.p_empty, p_drop=a.p_drop) for i in idx]
        ids = tokenize(caps)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        ts = torch.randint(0, 1000, (a.batch,), generator=gen)
        zt = sched.add_noise(z0, noise, ts)
        enc = te(ids)[0]
        pred = unet(zt, ts, enc).sample
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        w = torch.clamp(snr[ts], max=a.min_snr) / snr[ts] if a.min_snr > 0 else torch.ones_like(mse)
        if a.high_noise_weight > 1:
            # x0-like weighting where the noise dominates (1/SNR, capped): the layout is decided
            # there, and the epsilon loss pays it only ~SNR times the error in the image
            w = w * torch.clamp(1.0 / snr[ts], min=1.0, max=a.high_noise_weight)
        loss = (w * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        ema.update(step)
        v = torch.tensor([mse.mean().item(), loss.item()])
        run = v if run is None else 0.98 * run + 0.02 * v
        if step % a.log_every == 0 or step == a.steps - 1:
            el = time.time() - t0
            log("unet step %5d/%d  mse %.4f  wloss %.4f  (ema mse %.4f wloss %.4f)  gnorm %.2f  lr %.2e  %.0fs  eta %.0fs"
                % (step, a.steps, v[0], v[1], run[0], run[1], gn.item(), opt.param_groups[0]["lr"], el,
                   el / (step + 1) * (a.steps - step - 1)))
        if (a.save_every and (step + 1) % a.save_every == 0) or step == a.steps - 1:
            # save EMA weights (swap in, save, swap back)
            backup = [p.detach().clone() for p in ema.params]
            ema.copy_to()
            info = {
                "seed": a.seed, "args": vars(a), "steps_done": step + 1,
                "vae_final_train": vae_final, "vae_heldout": vae_val, "scaling_factor": scaling,
                "unet_final_ema_mse": run[0].item(), "unet_final_ema_weighted_loss": run[1].item(),
                "stage2_seconds": time.time() - t0, "total_seconds": time.time() - T0,
            }
            save_all(a, a.out, vae, te.eval(), unet.eval(), tok_src, copy_tok, scaling, info)
            te.train(); unet.train()
            with torch.no_grad():
                for s_, p_ in zip(backup, ema.params):
                    p_.copy_(s_)
            log("saved EMA weights at step %d to %s" % (step + 1, a.out))

    # held-out eps-mse of the EMA model at a few fixed timesteps
    ema.copy_to()
    unet.eval(); te.eval()
    vg = torch.Generator().manual_seed(a.seed + 5)
    vrng = np.random.RandomState(a.seed + 6)
    _, vattrs = make_dataset(256, a.seed + 999)
    with torch.no_grad():
        zv = encode_all(vae, val_imgs)[0] * scaling
        ids = tokenize([caption(r, vrng, p_empty=0.0, p_drop=0.0) for r in vattrs])
        enc = te(ids)[0]
        res = {}
        for tv in (50, 250, 500, 750, 950):
            nz = torch.randn(zv.shape, generator=vg)
            tt = torch.full((len(zv),), tv, dtype=torch.long)
            res[tv] = ((unet(sched.add_noise(zv, nz, tt), tt, enc).sample - nz) ** 2).mean().item()
    log("held-out EMA eps-mse by timestep: %s" % json.dumps(res))
    info["heldout_eps_mse"] = res
    info["total_seconds"] = time.time() - T0
    with open(os.path.join(a.out, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    log("done: total %.1fs (%.1f min)" % (time.time() - T0, (time.time() - T0) / 60))


if __name__ == "__main__":
    main()
