//! Training: maximum likelihood for flows (the log-det gradient by the Neumann
//! series of Residual Flows, or exactly for small dimensions) and
//! cross-entropy for classifiers, over the IR with the f64 ops of the
//! reference executor; the branches' matrix products behind
//! [`kernels::LinearKernels`] (the CPU engine's f32 GEMMs, or the f64 reference).

pub mod branch;
pub mod checkpoint;
pub mod data;
pub mod grad;
pub mod kernels;
pub mod linear;
pub mod logdet;
pub mod mat;
pub mod optim;
pub mod plots;
pub mod sample;
pub mod specnorm;
pub mod toy;
#[path = "loop.rs"]
pub mod trainer;

pub use grad::{loss_grad, loss_grad_parallel, Options, Out};
pub use kernels::{Backend, LinearKernels};
pub use logdet::{LogDetGrad, Noise};
pub use mat::Mat;
