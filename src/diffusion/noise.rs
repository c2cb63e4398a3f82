//! torch's CPU random generator, bit for bit: what `torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(shape, generator=g, dtype=torch.float32)` returns, which is how diffusers' `randn_tensor`
//! draws initial latents and per-step noise on the CPU with one generator. Matches torch 2.15.0 on an
//! x86-64 CPU with AVX2 (checked against `tests/data/diffusion/torch_randn.json`).
//!
//! - **Engine.** `CPUGeneratorImpl` is a 32-bit MT19937 (`ATen/core/MT19937RNGEngine.h`), seeded with the
//!   low 32 bits of the seed. The worker accepts seeds `0..=4294967295`; larger values wrap as in torch.
//! - **`randn` of 16 or more values** (`normal_fill_AVX2` in `ATen/native/cpu/DistributionTemplates.h`,
//!   the kernel torch dispatches to on AVX2 and AVX-512 CPUs): fill the whole buffer with float uniforms
//!   `(random() & 0xffffff) * 2^-24`, then apply Box–Muller to blocks of 16 in place (`u1 = 1 - u[j]`,
//!   `u2 = u[j + 8]`; `r·cos` goes to `j`, `r·sin` to `j + 8`), using the Cephes polynomial `log` and
//!   `sincos` of `avx_mathfun.h` in float32 with the fused multiply-adds GCC emitted for them (read from
//!   the wheel's machine code). When the size is not a multiple of 16, the last 16 values are redrawn from
//!   16 fresh uniforms and recomputed. (torch on a CPU without AVX2 uses libm's `logf`/`sinf`/`cosf`
//!   instead and differs in the last bits; this module always gives the AVX2 kernel's values.)
//! - **`randn` of fewer than 16 values**: one `normal_distribution<double>` sample per value (two 53-bit
//!   uniforms, `sqrt(-2·log1p(-u2))`, `cos`/`sin` of `2π·u1`), narrowed to float32. The `sin` half is
//!   cached in the generator and returned by the next small draw, as torch does.
//!
//!   The float64 `log1p`/`sin`/`cos` are the platform libm's, as torch's are (glibc on Linux).
//!
//! Consecutive `randn` calls continue one stream, like consecutive `torch.randn` calls on one generator.
//! Two draws equal one longer draw only when both sizes are multiples of 16.

/// MT19937 state size (words).
const N: usize = 624;
/// MT19937 middle word offset.
const M: usize = 397;

/// A seeded torch CPU generator: plain data a request owns, so it can be paused, resumed or cloned.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    state: Box<[u32; N]>,
    /// Index of the next state word to temper; `N` means the state must be regenerated first.
    next: usize,
    /// The second Box–Muller value of `normal_distribution<double>`, kept for the next small draw.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// The generator after `manual_seed(seed)` (only the low 32 bits of `seed` matter, as in torch).
    pub fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            next: N,
            next_double_normal: None,
        }
    }

    /// `torch.randn(n, generator=g, dtype=torch.float32)`, continuing this generator's stream.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_double() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// One 32-bit draw (`CPUGeneratorImpl::random`).
    fn random(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Two draws, the first as the high word (`CPUGeneratorImpl::random64`).
    fn random64(&mut self) -> u64 {
        let hi = u64::from(self.random());
        let lo = u64::from(self.random());
        (hi << 32) | lo
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        for i in 0..N {
            let y = (s[i] & 0x8000_0000) | (s[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            s[i] = s[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled by 2^-24.
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled by 2^-53.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>(0, 1)` with torch's one-value cache.
    fn normal_double(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = ((-u2).ln_1p() * -2.0).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

/// `normal_fill_16_AVX2`: Box–Muller on 16 uniforms in place, pairs `(j, j + 8)`.
fn box_muller_16(data: &mut [f32]) {
    let two_pi = f32::from_bits(0x40c9_0fdb);
    for j in 0..8 {
        let radius = (-2.0 * cephes_log(1.0 - data[j])).sqrt();
        let (sin, cos) = cephes_sincos(two_pi * data[j + 8]);
        // torch stores fmadd(n, std = 1, mean = 0): `+ 0.0` rounds the same way.
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

/// `log256_ps` of `avx_mathfun.h`, one lane, with the FMA contractions of torch's build. `x` is in (0, 1].
fn cephes_log(x: f32) -> f32 {
    const P: [u32; 9] = [
        0x3d90_21bb,
        0xbdeb_d1b8,
        0x3def_251a,
        0xbdfe_5d4f,
        0x3e11_e9bf,
        0xbe2a_ae50,
        0x3e4c_ceac,
        0xbe7f_fffc,
        0x3eaa_aaaa,
    ];
    let q1 = f32::from_bits(0xb95e_8083);
    let q2 = f32::from_bits(0x3f31_8000);
    let invalid = x <= 0.0;
    let x = x.max(f32::MIN_POSITIVE);
    let exponent = (x.to_bits() >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let below = x < f32::from_bits(0x3f35_04f3); // sqrt(1/2)
    let tmp = if below { x } else { 0.0 };
    x += -1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = f32::from_bits(P[0]).mul_add(x, f32::from_bits(P[1]));
    for p in &P[2..] {
        y = y.mul_add(x, f32::from_bits(*p));
    }
    y *= x;
    y = y.mul_add(z, e * q1);
    let y = (-z).mul_add(0.5, y);
    let x = e.mul_add(q2, x + y);
    if invalid {
        f32::NAN
    } else {
        x
    }
}

/// `sincos256_ps` of `avx_mathfun.h`, one lane, with the FMA contractions of torch's build: `(sin, cos)`.
fn cephes_sincos(x: f32) -> (f32, f32) {
    let sign_sin = x.to_bits() & 0x8000_0000;
    let x = x.abs();
    let j = ((x * f32::from_bits(0x3fa2_f983)) as i32 + 1) & !1; // 4/π
    let y = j as f32;
    let sign_sin = sign_sin ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let poly_mask: u32 = if j & 2 == 0 { u32::MAX } else { 0 };
    let mut x = y.mul_add(f32::from_bits(0xbf49_0000), x);
    x = y.mul_add(f32::from_bits(0xb97d_a000), x);
    x = y.mul_add(f32::from_bits(0xb322_2169), x);
    let z = x * x;
    let half_z = z * 0.5;
    let mut yc = f32::from_bits(0x37cc_f5ce).mul_add(z, f32::from_bits(0xbab6_061a));
    yc = yc.mul_add(z, f32::from_bits(0x3d2a_aaa5));
    yc = z.mul_add(z * yc, -half_z) + 1.0;
    let mut ys = f32::from_bits(0xb94c_a1f9).mul_add(z, f32::from_bits(0x3c08_839e));
    ys = ys.mul_add(z, f32::from_bits(0xbe2a_aaa3));
    ys = x.mul_add(z * ys, x);
    // The selects are arithmetic in the original (masked values subtracted and added); keep them so.
    let ysin2 = f32::from_bits(ys.to_bits() & poly_mask);
    let ysin1 = f32::from_bits(yc.to_bits() & !poly_mask);
    let sin = ysin2 + ysin1;
    let cos = (ys - ysin2) + (yc - ysin1);
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of `tests/data/diffusion/torch_randn.json` (torch 2.15.0, AVX2), bit for bit:
    /// 5 seeds × single draws of 1 to 1000 values and sequences of draws from one generator.
    #[test]
    fn randn_equals_torch_bit_for_bit() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/diffusion/torch_randn.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut compared = 0;
        for draw in doc["draws"].as_array().unwrap() {
            let seed = draw["seed"].as_u64().unwrap();
            let mut generator = TorchGenerator::new(seed);
            for (size, values) in draw["sizes"]
                .as_array()
                .unwrap()
                .iter()
                .zip(draw["values"].as_array().unwrap())
            {
                let got = generator.randn(size.as_u64().unwrap() as usize);
                let want: Vec<f32> = values
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                assert_eq!(got.len(), want.len());
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "seed {seed}, sizes {}, value {k}: {g} != {w}",
                        draw["sizes"]
                    );
                }
                compared += got.len();
            }
        }
        assert_eq!(compared, 16_995, "values in torch_randn.json");
    }

    #[test]
    fn draws_of_multiples_of_16_concatenate() {
        let mut one = TorchGenerator::new(42);
        let mut two = TorchGenerator::new(42);
        let mut joined = two.randn(32);
        joined.extend(two.randn(16));
        assert_eq!(one.randn(48), joined);
    }

    #[test]
    fn only_the_low_32_bits_of_the_seed_matter() {
        assert_eq!(
            TorchGenerator::new((1 << 32) + 5).randn(20),
            TorchGenerator::new(5).randn(20)
        );
        assert_ne!(TorchGenerator::new(6).randn(20), TorchGenerator::new(5).randn(20));
    }
}
