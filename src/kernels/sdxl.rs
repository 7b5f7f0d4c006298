//! The SDXL base 1.0 shapes at 1024×1024 (128×128 latents) for `ldm bench --shapes sdxl`: every
//! distinct matmul, convolution, attention and norm call of one guided U-Net step (batch 2),
//! both text encoders and the VAE decoder, as `kernels::sd15` lists SD 1.5's. Data only: the
//! kernels do not read these tables.
//!
//! From stabilityai/stable-diffusion-xl-base-1.0's unet/config.json: block_out_channels
//! (320, 640, 1280), DownBlock2D then two CrossAttnDownBlock2D (no attention at 128², transformer
//! depth 2 at 64² and 10 at 32² and in the mid block), layers_per_block 2, attention_head_dim
//! (5, 10, 20) heads of 64, use_linear_projection (proj_in/out are linear layers), context 2048
//! (CLIP ViT-L 768 + OpenCLIP bigG 1280), text_time added embedding 1280 + 6 × 256 = 2816.

use super::sd15::{ConvCase, NormCase};

/// The linear layers of the SDXL base U-Net at 1024² with classifier-free guidance (batch 2),
/// plus both text encoders' (batch 2 × 77 tokens): (name, M, N, K). As in `sd15::MATMUL`, the
/// `*.ff.geglu` rows' N is the weight's row count (2 × inner dim).
pub const MATMUL: &[(&str, usize, usize, usize)] = &[
    ("xl.time_embedding.linear_1", 2, 1280, 320),
    ("xl.time_embedding.linear_2", 2, 1280, 1280),
    ("xl.add_embedding.linear_1", 2, 1280, 2816),
    ("xl.64x64.proj_in|to_q|to_out", 8192, 640, 640),
    ("xl.64x64.attn2.to_k|to_v", 154, 640, 2048),
    ("xl.64x64.ff.geglu", 8192, 5120, 640),
    ("xl.64x64.ff.out", 8192, 640, 2560),
    ("xl.32x32.proj_in|to_q|to_out", 2048, 1280, 1280),
    ("xl.32x32.attn2.to_k|to_v", 154, 1280, 2048),
    ("xl.32x32.ff.geglu", 2048, 10240, 1280),
    ("xl.32x32.ff.out", 2048, 1280, 5120),
    ("xl.clip_l.q|k|v|out_proj", 154, 768, 768),
    ("xl.clip_l.mlp.fc1", 154, 3072, 768),
    ("xl.clip_l.mlp.fc2", 154, 768, 3072),
    ("xl.clip_g.q|k|v|out_proj", 154, 1280, 1280),
    ("xl.clip_g.mlp.fc1", 154, 5120, 1280),
    ("xl.clip_g.mlp.fc2", 154, 1280, 5120),
];

/// Every distinct convolution of SDXL base at 1024²: (name, batch, height, width, cin, cout,
/// kernel, stride), padding `k / 2`. U-Net rows batch 2 (CFG), VAE decoder rows batch 1 (the
/// SD VAE's architecture at twice SD 1.5's size). `upsample` rows read the half-size input
/// through the fused 2× nearest upsampling, as the models run them; `conv2+shortcut` rows are
/// conv2 with the 1×1 shortcut as its K tail (see `sd15::CONV`).
#[rustfmt::skip]
pub const CONV: &[ConvCase] = &[
    ("xl.unet.conv_in", 2, 128, 128, 4, 320, 3, 1),
    ("xl.unet.res 320 128x128", 2, 128, 128, 320, 320, 3, 1),
    ("xl.unet.down0.downsample", 2, 128, 128, 320, 320, 3, 2),
    ("xl.unet.down1.res0.conv1", 2, 64, 64, 320, 640, 3, 1),
    ("xl.unet.down1.res0.conv2+shortcut", 2, 64, 64, 320, 640, 1, 1),
    ("xl.unet.res 640 64x64", 2, 64, 64, 640, 640, 3, 1),
    ("xl.unet.down1.downsample", 2, 64, 64, 640, 640, 3, 2),
    ("xl.unet.down2.res0.conv1", 2, 32, 32, 640, 1280, 3, 1),
    ("xl.unet.down2.res0.conv2+shortcut", 2, 32, 32, 640, 1280, 1, 1),
    ("xl.unet.res 1280 32x32", 2, 32, 32, 1280, 1280, 3, 1),
    ("xl.unet.up0.res.conv1 2560 32x32", 2, 32, 32, 2560, 1280, 3, 1),
    ("xl.unet.up0.res.conv2+shortcut 2560 32x32", 2, 32, 32, 2560, 1280, 1, 1),
    ("xl.unet.up0.res2.conv1 1920 32x32", 2, 32, 32, 1920, 1280, 3, 1),
    ("xl.unet.up0.res2.conv2+shortcut 1920 32x32", 2, 32, 32, 1920, 1280, 1, 1),
    ("xl.unet.up0.upsample 64x64", 2, 64, 64, 1280, 1280, 3, 1),
    ("xl.unet.up1.res0.conv1 1920 64x64", 2, 64, 64, 1920, 640, 3, 1),
    ("xl.unet.up1.res0.conv2+shortcut 1920 64x64", 2, 64, 64, 1920, 640, 1, 1),
    ("xl.unet.up1.res1.conv1 1280 64x64", 2, 64, 64, 1280, 640, 3, 1),
    ("xl.unet.up1.res1.conv2+shortcut 1280 64x64", 2, 64, 64, 1280, 640, 1, 1),
    ("xl.unet.up1.res2.conv1 960 64x64", 2, 64, 64, 960, 640, 3, 1),
    ("xl.unet.up1.res2.conv2+shortcut 960 64x64", 2, 64, 64, 960, 640, 1, 1),
    ("xl.unet.up1.upsample 128x128", 2, 128, 128, 640, 640, 3, 1),
    ("xl.unet.up2.res0.conv1 960 128x128", 2, 128, 128, 960, 320, 3, 1),
    ("xl.unet.up2.res0.conv2+shortcut 960 128x128", 2, 128, 128, 960, 320, 1, 1),
    ("xl.unet.up2.res.conv1 640 128x128", 2, 128, 128, 640, 320, 3, 1),
    ("xl.unet.up2.res.conv2+shortcut 640 128x128", 2, 128, 128, 640, 320, 1, 1),
    ("xl.unet.conv_out", 2, 128, 128, 320, 4, 3, 1),
    ("xl.vae.post_quant_conv", 1, 128, 128, 4, 4, 1, 1),
    ("xl.vae.dec.conv_in", 1, 128, 128, 4, 512, 3, 1),
    ("xl.vae.dec.res 512 128x128", 1, 128, 128, 512, 512, 3, 1),
    ("xl.vae.dec.up0.upsample 256x256", 1, 256, 256, 512, 512, 3, 1),
    ("xl.vae.dec.res 512 256x256", 1, 256, 256, 512, 512, 3, 1),
    ("xl.vae.dec.up1.upsample 512x512", 1, 512, 512, 512, 512, 3, 1),
    ("xl.vae.dec.up2.res0.conv1 512->256", 1, 512, 512, 512, 256, 3, 1),
    ("xl.vae.dec.up2.res0.conv2+shortcut 512->256", 1, 512, 512, 512, 256, 1, 1),
    ("xl.vae.dec.res 256 512x512", 1, 512, 512, 256, 256, 3, 1),
    ("xl.vae.dec.up2.upsample 1024x1024", 1, 1024, 1024, 256, 256, 3, 1),
    ("xl.vae.dec.up3.res0.conv1 256->128", 1, 1024, 1024, 256, 128, 3, 1),
    ("xl.vae.dec.up3.res0.conv2+shortcut 256->128", 1, 1024, 1024, 256, 128, 1, 1),
    ("xl.vae.dec.res 128 1024x1024", 1, 1024, 1024, 128, 128, 3, 1),
    ("xl.vae.dec.conv_out", 1, 1024, 1024, 128, 3, 3, 1),
];

/// Every attention call of one guided SDXL base U-Net step at 1024² (batch 2): (name, batch,
/// heads, Nq, Nk, head_dim). No attention at 128²; self and cross (77 tokens) at 64² (10 heads)
/// and 32² (20 heads, the mid block included).
pub const ATTENTION: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("xl.self 64x64", 2, 10, 4096, 4096, 64),
    ("xl.cross 64x64", 2, 10, 4096, 77, 64),
    ("xl.self 32x32", 2, 20, 1024, 1024, 64),
    ("xl.cross 32x32", 2, 20, 1024, 77, 64),
];

const fn gn(name: &'static str, shape: &'static [usize]) -> NormCase {
    NormCase {
        name,
        shape,
        groups: 32,
        silu: true,
    }
}

const fn ln(name: &'static str, shape: &'static [usize]) -> NormCase {
    NormCase {
        name,
        shape,
        groups: 0,
        silu: false,
    }
}

/// The GroupNorm / LayerNorm shapes of SDXL base at 1024² (U-Net batch 2, VAE decoder batch 1,
/// text encoders batch 2 × 77).
pub const NORM: &[NormCase] = &[
    gn("xl.unet_gn_128x128x320", &[2, 128, 128, 320]),
    gn("xl.unet_gn_64x64x640", &[2, 64, 64, 640]),
    gn("xl.unet_gn_32x32x1280", &[2, 32, 32, 1280]),
    gn("xl.unet_gn_128x128x960", &[2, 128, 128, 960]),
    gn("xl.vae_gn_128x128x512", &[1, 128, 128, 512]),
    gn("xl.vae_gn_256x256x512", &[1, 256, 256, 512]),
    gn("xl.vae_gn_512x512x256", &[1, 512, 512, 256]),
    gn("xl.vae_gn_1024x1024x128", &[1, 1024, 1024, 128]),
    ln("xl.unet_ln_4096x640", &[2, 4096, 640]),
    ln("xl.unet_ln_1024x1280", &[2, 1024, 1280]),
    ln("xl.clip_l_ln_77x768", &[2, 77, 768]),
    ln("xl.clip_g_ln_77x1280", &[2, 77, 1280]),
];
