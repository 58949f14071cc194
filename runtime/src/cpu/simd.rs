//! Elementwise kernels compiled for the widest SIMD level the CPU has.
//!
//! The crate is built for baseline x86-64 (SSE2, 4 f32 lanes), and `gemm` already picks its
//! micro-kernels at run time. The engine's own loops (activations, derivative masks, the
//! shift-accumulate of 3x3 convolutions) would otherwise stay 4 lanes wide on a machine with
//! AVX-512. [`simd_kernel!`] compiles one body three times (AVX-512F, AVX2+FMA, baseline) and
//! calls the best the CPU reports. Only elementwise IEEE operations run in these bodies and
//! Rust never contracts `a * b + c` into an FMA, so every level gives bit-identical results.

/// The SIMD level chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// The widest level this CPU supports (the feature checks are cached by std).
#[inline]
pub fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// `simd_kernel! { pub fn name(args) { body } }` defines `name` as a dispatcher over copies of
/// `body` compiled with AVX-512F, with AVX2+FMA, and for the baseline. The body must be safe code
/// (it is inlined into each copy); arguments are passed through unchanged.
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
            match $crate::cpu::simd::level() {
                // SAFETY: `level()` returned this level only after the CPU reported the features
                // the copy was compiled for.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Level::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Level::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use simd_kernel;
