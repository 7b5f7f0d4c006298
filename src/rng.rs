//! Torch-compatible Gaussian noise, bit-exact, so a seed means the same image here as in diffusers.
//!
//! * [`TorchCpuRng`]: `torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed))` in
//!   float32. Port of `/work/shared/reference/torch_cpu_randn.py`, itself a port of
//!   `aten/src/ATen/core/MT19937RNGEngine.h`, `CPUGeneratorImpl.cpp`,
//!   `core/DistributionsHelper.h` and `native/cpu/DistributionTemplates.h` (`normal_fill_16`,
//!   `normal_fill_16_AVX2`, which call `avx_mathfun.h`'s `log256_ps` / `sincos256_ps`).
//!   The generator is stateful like torch's: diffusers draws the initial latents and then (for
//!   ancestral samplers) the step noise from the same generator, so successive [`TorchCpuRng::randn`]
//!   calls continue the same stream, including the cached second Box-Muller value that torch keeps
//!   in the generator for tensors of fewer than 16 elements.
//! * [`PhiloxRng`]: AUTOMATIC1111's `modules/rng_philox.py` ("NV" noise source), which imitates
//!   `torch.randn(..., generator=torch.Generator('cuda'))` on the CPU with Philox4x32-10 and one
//!   Box-Muller output per counter.

/// Which float math torch's CPU kernel uses to turn uniforms into normals (tensors of >= 16 values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RandnVariant {
    /// `ATEN_CPU_CAPABILITY=avx2` or `avx512`: what diffusers gives on any AVX2 x86-64 CPU.
    #[default]
    Avx2,
    /// `ATEN_CPU_CAPABILITY=default` (and non-x86 builds): libm `logf`/`cosf`/`sinf`.
    Scalar,
}

impl RandnVariant {
    /// Parses `avx2` / `scalar` (also `default`, torch's name for the scalar build).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "avx2" | "avx512" => Some(Self::Avx2),
            "scalar" | "default" => Some(Self::Scalar),
            _ => None,
        }
    }
}

/// `at::mt19937`, seeded with the low 32 bits of the 64-bit seed (as torch does).
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; 624]>,
    left: u32,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            left: 1,
            next: 0,
        }
    }

    fn next_state(&mut self) {
        let s = &mut self.state;
        for k in 0..624 {
            let y = (s[k] & 0x8000_0000) | (s[(k + 1) % 624] & 0x7fff_ffff);
            let mag = if y & 1 != 0 { 0x9908_b0df } else { 0 };
            s[k] = s[(k + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.left = 624;
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `CPUGeneratorImpl::random64`: the first draw is the high word.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>`: 24 random bits scaled by 2^-24.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0f32 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>`: 53 random bits of `random64()` scaled by 2^-53.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0f64 / 9_007_199_254_740_992.0)
    }
}

/// `torch.Generator('cpu').manual_seed(seed)` followed by any number of float32 `torch.randn` calls.
#[derive(Clone)]
pub struct TorchCpuRng {
    engine: Mt19937,
    variant: RandnVariant,
    /// torch's `next_double_normal_sample_`: the sine half of the last Box-Muller pair drawn by a
    /// small (< 16 element) randn, returned first by the next small randn.
    cached_normal: Option<f64>,
}

impl TorchCpuRng {
    /// A generator with the default (AVX2) math, as diffusers runs on x86-64.
    pub fn new(seed: u64) -> Self {
        Self::with_variant(seed, RandnVariant::Avx2)
    }

    pub fn with_variant(seed: u64, variant: RandnVariant) -> Self {
        Self {
            engine: Mt19937::new(seed),
            variant,
            cached_normal: None,
        }
    }

    pub fn variant(&self) -> RandnVariant {
        self.variant
    }

    /// `torch.randn(n, generator=g)` (float32, row-major, any shape of `n` elements).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            // aten normal_kernel falls back to the serial at::normal_distribution<double>.
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.engine.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            self.fill16(block);
        }
        if !n.is_multiple_of(16) {
            // torch recomputes the last 16 values from 16 fresh uniforms.
            let mut tail = [0f32; 16];
            for v in tail.iter_mut() {
                *v = self.engine.uniform_f32();
            }
            self.fill16(&mut tail);
            data[n - 16..].copy_from_slice(&tail);
        }
        data
    }

    /// `at::normal_distribution<double>` with the generator-held cache of the second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.engine.uniform_f64();
        let u2 = self.engine.uniform_f64();
        let radius = (-2.0 * libm::log1p(-u2)).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * libm::sin(theta));
        radius * libm::cos(theta)
    }

    /// `normal_fill_16`: values j and j+8 of a block of 16 uniforms become a Box-Muller pair.
    fn fill16(&self, block: &mut [f32]) {
        for j in 0..8 {
            let u1 = 1.0f32 - block[j];
            let u2 = block[j + 8];
            let (radius, sin, cos) = match self.variant {
                RandnVariant::Scalar => {
                    let radius = libm::sqrtf(-2.0f32 * libm::logf(u1));
                    // c10::pi<double> makes the angle a double product, rounded to float.
                    let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
                    (radius, libm::sinf(theta), libm::cosf(theta))
                }
                RandnVariant::Avx2 => {
                    let radius = (-2.0f32 * avx_mathfun::log256(u1)).sqrt();
                    let theta = (2.0 * std::f64::consts::PI) as f32 * u2;
                    let (sin, cos) = avx_mathfun::sincos256(theta);
                    (radius, sin, cos)
                }
            };
            block[j] = radius * cos;
            block[j + 8] = radius * sin;
        }
    }
}

/// The libm functions torch's scalar path calls. On Linux we call glibc directly so the last bit
/// matches torch's wheels; elsewhere Rust's std (the platform libm) is used, which may differ from
/// glibc by one ulp on rare inputs.
mod libm {
    #[cfg(target_os = "linux")]
    mod sys {
        extern "C" {
            pub fn logf(x: f32) -> f32;
            pub fn sinf(x: f32) -> f32;
            pub fn cosf(x: f32) -> f32;
            pub fn log1p(x: f64) -> f64;
            pub fn log(x: f64) -> f64;
            pub fn sin(x: f64) -> f64;
            pub fn cos(x: f64) -> f64;
        }
    }

    #[cfg(target_os = "linux")]
    macro_rules! libm_fn {
        ($name:ident, $t:ty, $std:expr) => {
            pub fn $name(x: $t) -> $t {
                // SAFETY: pure C math functions without side effects on valid floats.
                unsafe { sys::$name(x) }
            }
        };
    }
    #[cfg(not(target_os = "linux"))]
    macro_rules! libm_fn {
        ($name:ident, $t:ty, $std:expr) => {
            pub fn $name(x: $t) -> $t {
                $std(x)
            }
        };
    }

    libm_fn!(logf, f32, f32::ln);
    libm_fn!(sinf, f32, f32::sin);
    libm_fn!(cosf, f32, f32::cos);
    libm_fn!(log1p, f64, f64::ln_1p);
    libm_fn!(log, f64, f64::ln);
    libm_fn!(sin, f64, f64::sin);
    libm_fn!(cos, f64, f64::cos);

    /// IEEE sqrt is correctly rounded everywhere.
    pub fn sqrtf(x: f32) -> f32 {
        x.sqrt()
    }
}

/// `aten/src/ATen/native/cpu/avx_mathfun.h` (Cephes-derived) one lane at a time, with the fused
/// multiply-adds exactly where the compiler contracts them in torch's x86-64 wheels.
/// The constants are the header's own decimal spellings, kept verbatim.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
mod avx_mathfun {
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    /// `log256_ps`.
    pub fn log256(x: f32) -> f32 {
        let x = x.max(f32::from_bits(0x0080_0000)); // cut off denormals
        let bits = x.to_bits();
        let mut e = (((bits >> 23) as i32) - 0x7f) as f32 + 1.0;
        let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let mut tmp = 0.0f32;
        if x < 0.707_106_781_186_547_524f32 {
            tmp = x;
            e -= 1.0;
        }
        x = (x - 1.0) + tmp;
        let z = x * x;
        let mut y = 7.037_683_629_2E-2f32;
        for p in [
            -1.151_461_031_0E-1f32,
            1.167_699_874_0E-1,
            -1.242_014_084_6E-1,
            1.424_932_278_7E-1,
            -1.666_805_766_5E-1,
            2.000_071_476_5E-1,
            -2.499_999_399_3E-1,
            3.333_333_117_4E-1,
        ] {
            y = fma(y, x, p);
        }
        y *= x;
        y = fma(y, z, e * -2.121_944_40e-4); // fused as (y*x)*z + round(e*q1)
        y -= z * 0.5;
        x += y;
        x + e * 0.693_359_375 // e*q2 is exact
    }

    /// `sincos256_ps`, returns (sin, cos).
    pub fn sincos256(x: f32) -> (f32, f32) {
        let mut sign_sin = x.to_bits() & 0x8000_0000;
        let mut x = x.abs();
        let j = ((x * 1.273_239_544_735_16f32) as i32 + 1) & !1;
        let y = j as f32;
        sign_sin ^= ((j & 4) as u32) << 29;
        let poly = j & 2 == 0;
        let sign_cos = (((!(j - 2)) & 4) as u32) << 29;
        for dp in [
            -0.785_156_25f32,
            -2.418_756_484_985_351_562_5e-4,
            -3.774_894_977_441_081e-8,
        ] {
            x = fma(y, dp, x);
        }
        let z = x * x;
        let mut yc = fma(2.443_315_711_809_948E-5f32, z, -1.388_731_625_493_765E-3);
        yc = fma(yc, z, 4.166_664_568_298_827E-2);
        yc = fma(yc * z, z, -(z * 0.5)); // fused as (yc*z)*z - z*0.5
        yc += 1.0;
        let mut ys = fma(-1.951_529_589_1E-4f32, z, 8.332_160_873_6E-3);
        ys = fma(ys, z, -1.666_665_461_1E-1);
        ys = fma(ys * z, x, x);
        let (s, c) = if poly { (ys, yc) } else { (yc, ys) };
        (
            f32::from_bits(s.to_bits() ^ sign_sin),
            f32::from_bits(c.to_bits() ^ sign_cos),
        )
    }
}

/// AUTOMATIC1111's `rng_philox.Generator`: Philox4x32-10 keyed by the 64-bit seed, counter
/// `[offset, 0, index, 0]`, one Box-Muller value (the sine half) per element, computed in f64 from
/// f32 constants exactly as the numpy original promotes them. `offset` advances by one per call.
#[derive(Clone, Debug)]
pub struct PhiloxRng {
    seed: u64,
    offset: u32,
}

const PHILOX_M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
const PHILOX_W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];

impl PhiloxRng {
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    /// The raw Philox4x32-10 block for a counter and key.
    pub fn philox4x32_10(mut counter: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
        for round in 0..10 {
            let p0 = counter[0] as u64 * PHILOX_M[0] as u64;
            let p1 = counter[2] as u64 * PHILOX_M[1] as u64;
            counter = [
                (p1 >> 32) as u32 ^ counter[1] ^ key[0],
                p1 as u32,
                (p0 >> 32) as u32 ^ counter[3] ^ key[1],
                p0 as u32,
            ];
            if round < 9 {
                key[0] = key[0].wrapping_add(PHILOX_W[0]);
                key[1] = key[1].wrapping_add(PHILOX_W[1]);
            }
        }
        counter
    }

    /// `Generator.randn(shape)` with `n` = number of elements.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        // numpy: float32 constants, promoted to float64 when multiplied by the uint32 counters.
        let two_pow32_inv = 2.328_306_4e-10f32;
        let two_pow32_inv_2pi = (2.328_306_4e-10f64 * 6.283_185_5f64) as f32;
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let offset = self.offset;
        self.offset = self.offset.wrapping_add(1);
        (0..n)
            .map(|i| {
                let g = Self::philox4x32_10([offset, 0, i as u32, 0], key);
                let u = g[0] as f64 * two_pow32_inv as f64 + (two_pow32_inv / 2.0) as f64;
                let v = g[1] as f64 * two_pow32_inv_2pi as f64 + (two_pow32_inv_2pi / 2.0) as f64;
                let s = (-2.0 * libm::log(u)).sqrt();
                (s * libm::sin(v)) as f32
            })
            .collect()
    }
}

/// A seed from the clock and the process id, for runs without `--seed`.
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut x = (nanos as u64) ^ ((std::process::id() as u64) << 32);
    // splitmix64 finaliser; keep it below 2^32 so the seed is easy to retype (A1111 does too).
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    (x ^ (x >> 31)) & 0xffff_ffff
}
