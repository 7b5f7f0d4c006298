//! The Stable Diffusion 1.5 shapes at 512×512 (64×64 latents) that the kernel tests and
//! `benches/kernels.rs` run: every distinct matmul, convolution, attention and norm call of one
//! guided U-Net step (batch 2), the CLIP text encoder and the VAE decoder. Data only: the kernels
//! do not read these tables.

/// The linear layers of the SD 1.5 U-Net at 512 × 512 (64 × 64 latents) with classifier-free
/// guidance (batch 2), plus the CLIP text encoder's (batch 2 × 77 tokens): (name, M, N, K).
/// In the `*.ff.geglu` rows N is the weight's row count (2 × inner dim); the fused GEGLU output
/// has N / 2 columns. `proj_in` / `proj_out` are 1 × 1 convolutions, i.e. linear layers in NHWC.
pub const MATMUL: &[(&str, usize, usize, usize)] = &[
    ("time_embedding.linear_1", 2, 1280, 320),
    ("time_embedding.linear_2", 2, 1280, 1280),
    ("64x64.proj_in|to_q|to_out", 8192, 320, 320),
    ("64x64.attn2.to_k|to_v", 154, 320, 768),
    ("64x64.ff.geglu", 8192, 2560, 320),
    ("64x64.ff.out", 8192, 320, 1280),
    ("32x32.proj_in|to_q|to_out", 2048, 640, 640),
    ("32x32.attn2.to_k|to_v", 154, 640, 768),
    ("32x32.ff.geglu", 2048, 5120, 640),
    ("32x32.ff.out", 2048, 640, 2560),
    ("16x16.proj_in|to_q|to_out", 512, 1280, 1280),
    ("16x16.attn2.to_k|to_v", 154, 1280, 768),
    ("16x16.ff.geglu", 512, 10240, 1280),
    ("16x16.ff.out", 512, 1280, 5120),
    ("8x8.mid.proj_in|to_q|to_out", 128, 1280, 1280),
    ("8x8.mid.ff.geglu", 128, 10240, 1280),
    ("8x8.mid.ff.out", 128, 1280, 5120),
    ("clip.q|k|v|out_proj", 154, 768, 768),
    ("clip.mlp.fc1", 154, 3072, 768),
    ("clip.mlp.fc2", 154, 768, 3072),
];

/// One convolution of Stable Diffusion 1.5 at 512×512 (64×64 latents):
/// (name, batch, height, width, cin, cout, kernel size, stride). Padding is `k / 2` on every side
/// (diffusers' `Conv2d(..., padding=1)` for 3×3, 0 for 1×1). U-Net rows use batch 2
/// (classifier-free guidance); VAE decoder rows batch 1. Each distinct shape is listed once (e.g.
/// "unet.res 320 64x64" stands for down-block 0's four resnet convs and up-block 3's conv2s).
/// Rows named `conv2+shortcut` are a resnet's 3×3 conv2 (Cout → Cout) with its 1×1
/// conv_shortcut (the row's Cin → Cout) as more K of the same GEMM, as the models run them
/// (`conv2d::Shortcut`); the benchmark times them that way.
#[rustfmt::skip]
/// (name, batch, height, width, c_in, c_out, kernel, stride)
pub type ConvCase = (&'static str, usize, usize, usize, usize, usize, usize, usize);

pub const CONV: &[ConvCase] = &[
    // U-Net (diffusers UNet2DConditionModel, stable-diffusion-v1-5/unet/config.json)
    ("unet.conv_in", 2, 64, 64, 4, 320, 3, 1),
    ("unet.res 320 64x64", 2, 64, 64, 320, 320, 3, 1),
    ("unet.proj_in/out 320 64x64", 2, 64, 64, 320, 320, 1, 1),
    ("unet.down0.downsample", 2, 64, 64, 320, 320, 3, 2),
    ("unet.down1.res0.conv1", 2, 32, 32, 320, 640, 3, 1),
    ("unet.down1.res0.conv2+shortcut", 2, 32, 32, 320, 640, 1, 1),
    ("unet.res 640 32x32", 2, 32, 32, 640, 640, 3, 1),
    ("unet.proj_in/out 640 32x32", 2, 32, 32, 640, 640, 1, 1),
    ("unet.down1.downsample", 2, 32, 32, 640, 640, 3, 2),
    ("unet.down2.res0.conv1", 2, 16, 16, 640, 1280, 3, 1),
    ("unet.down2.res0.conv2+shortcut", 2, 16, 16, 640, 1280, 1, 1),
    ("unet.res 1280 16x16", 2, 16, 16, 1280, 1280, 3, 1),
    ("unet.proj_in/out 1280 16x16", 2, 16, 16, 1280, 1280, 1, 1),
    ("unet.down2.downsample", 2, 16, 16, 1280, 1280, 3, 2),
    ("unet.res 1280 8x8", 2, 8, 8, 1280, 1280, 3, 1),
    ("unet.mid.proj_in/out 1280 8x8", 2, 8, 8, 1280, 1280, 1, 1),
    ("unet.up0.res.conv1 2560 8x8", 2, 8, 8, 2560, 1280, 3, 1),
    (
        "unet.up0.res.conv2+shortcut 2560 8x8",
        2,
        8,
        8,
        2560,
        1280,
        1,
        1,
    ),
    ("unet.up0.upsample 16x16", 2, 16, 16, 1280, 1280, 3, 1),
    ("unet.up1.res.conv1 2560 16x16", 2, 16, 16, 2560, 1280, 3, 1),
    (
        "unet.up1.res.conv2+shortcut 2560 16x16",
        2,
        16,
        16,
        2560,
        1280,
        1,
        1,
    ),
    (
        "unet.up1.res2.conv1 1920 16x16",
        2,
        16,
        16,
        1920,
        1280,
        3,
        1,
    ),
    (
        "unet.up1.res2.conv2+shortcut 1920 16x16",
        2,
        16,
        16,
        1920,
        1280,
        1,
        1,
    ),
    ("unet.up1.upsample 32x32", 2, 32, 32, 1280, 1280, 3, 1),
    ("unet.up2.res0.conv1 1920 32x32", 2, 32, 32, 1920, 640, 3, 1),
    (
        "unet.up2.res0.conv2+shortcut 1920 32x32",
        2,
        32,
        32,
        1920,
        640,
        1,
        1,
    ),
    ("unet.up2.res1.conv1 1280 32x32", 2, 32, 32, 1280, 640, 3, 1),
    (
        "unet.up2.res1.conv2+shortcut 1280 32x32",
        2,
        32,
        32,
        1280,
        640,
        1,
        1,
    ),
    ("unet.up2.res2.conv1 960 32x32", 2, 32, 32, 960, 640, 3, 1),
    (
        "unet.up2.res2.conv2+shortcut 960 32x32",
        2,
        32,
        32,
        960,
        640,
        1,
        1,
    ),
    ("unet.up2.upsample 64x64", 2, 64, 64, 640, 640, 3, 1),
    ("unet.up3.res0.conv1 960 64x64", 2, 64, 64, 960, 320, 3, 1),
    (
        "unet.up3.res0.conv2+shortcut 960 64x64",
        2,
        64,
        64,
        960,
        320,
        1,
        1,
    ),
    ("unet.up3.res.conv1 640 64x64", 2, 64, 64, 640, 320, 3, 1),
    (
        "unet.up3.res.conv2+shortcut 640 64x64",
        2,
        64,
        64,
        640,
        320,
        1,
        1,
    ),
    ("unet.conv_out", 2, 64, 64, 320, 4, 3, 1),
    // VAE decoder (diffusers AutoencoderKL, stable-diffusion-v1-5/vae/config.json)
    ("vae.post_quant_conv", 1, 64, 64, 4, 4, 1, 1),
    ("vae.dec.conv_in", 1, 64, 64, 4, 512, 3, 1),
    ("vae.dec.res 512 64x64", 1, 64, 64, 512, 512, 3, 1),
    ("vae.dec.up0.upsample 128x128", 1, 128, 128, 512, 512, 3, 1),
    ("vae.dec.res 512 128x128", 1, 128, 128, 512, 512, 3, 1),
    ("vae.dec.up1.upsample 256x256", 1, 256, 256, 512, 512, 3, 1),
    (
        "vae.dec.up2.res0.conv1 512->256",
        1,
        256,
        256,
        512,
        256,
        3,
        1,
    ),
    (
        "vae.dec.up2.res0.conv2+shortcut 512->256",
        1,
        256,
        256,
        512,
        256,
        1,
        1,
    ),
    ("vae.dec.res 256 256x256", 1, 256, 256, 256, 256, 3, 1),
    ("vae.dec.up2.upsample 512x512", 1, 512, 512, 256, 256, 3, 1),
    (
        "vae.dec.up3.res0.conv1 256->128",
        1,
        512,
        512,
        256,
        128,
        3,
        1,
    ),
    (
        "vae.dec.up3.res0.conv2+shortcut 256->128",
        1,
        512,
        512,
        256,
        128,
        1,
        1,
    ),
    ("vae.dec.res 128 512x512", 1, 512, 512, 128, 128, 3, 1),
    ("vae.dec.conv_out", 1, 512, 512, 128, 3, 3, 1),
];

/// SD 1.5 at 512×512 (64×64 latents) with classifier-free guidance (batch 2): every attention
/// call of one U-Net step, as (name, batch, heads, Nq, Nk, head_dim). Self-attention at 64², 32²,
/// 16² and the 8² mid block; cross-attention against the 77 CLIP tokens.
pub const ATTENTION: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("self 64x64", 2, 8, 4096, 4096, 40),
    ("cross 64x64", 2, 8, 4096, 77, 40),
    ("self 32x32", 2, 8, 1024, 1024, 80),
    ("cross 32x32", 2, 8, 1024, 77, 80),
    ("self 16x16", 2, 8, 256, 256, 160),
    ("cross 16x16", 2, 8, 256, 77, 160),
    ("self 8x8 (mid)", 2, 8, 64, 64, 160),
    ("cross 8x8 (mid)", 2, 8, 64, 77, 160),
];

/// One norm case of SD 1.5 at 512×512 (batch 2 = CFG): `shape` is the NHWC input (or tokens
/// [B, N, C] for layer norm), `groups` 0 means LayerNorm over the last dim.
#[derive(Clone, Copy, Debug)]
pub struct NormCase {
    pub name: &'static str,
    pub shape: &'static [usize],
    pub groups: usize,
    pub silu: bool,
}

/// The GroupNorm / LayerNorm shapes of SD 1.5 at 512×512 (U-Net with CFG batch 2, VAE decoder
/// batch 1), used by the tests and the benches.
pub const NORM: &[NormCase] = &[
    NormCase {
        name: "unet_gn_64x64x320",
        shape: &[2, 64, 64, 320],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "unet_gn_32x32x640",
        shape: &[2, 32, 32, 640],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "unet_gn_16x16x1280",
        shape: &[2, 16, 16, 1280],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "unet_gn_8x8x1280",
        shape: &[2, 8, 8, 1280],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "unet_gn_64x64x960",
        shape: &[2, 64, 64, 960],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "vae_gn_128x128x512",
        shape: &[1, 128, 128, 512],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "vae_gn_256x256x256",
        shape: &[1, 256, 256, 256],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "vae_gn_512x512x128",
        shape: &[1, 512, 512, 128],
        groups: 32,
        silu: true,
    },
    NormCase {
        name: "unet_ln_4096x320",
        shape: &[2, 4096, 320],
        groups: 0,
        silu: false,
    },
    NormCase {
        name: "unet_ln_1024x640",
        shape: &[2, 1024, 640],
        groups: 0,
        silu: false,
    },
    NormCase {
        name: "unet_ln_256x1280",
        shape: &[2, 256, 1280],
        groups: 0,
        silu: false,
    },
    NormCase {
        name: "clip_ln_77x768",
        shape: &[2, 77, 768],
        groups: 0,
        silu: false,
    },
];
