// Activations (Lipschitz <= 1) and their derivatives, f32 versions of
// `iresnetc::ops::activation::{apply, derivative}`. `beta` is LipSwish's softplus(b)
// (ignored by the others). Pasted into kernels that need them.

fn softplus(x: f32) -> f32 {
    if (x > 30.0) {
        return x;
    }
    return log(1.0 + exp(x));
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn act_elu(x: f32, beta: f32) -> f32 {
    if (x > 0.0) {
        return x;
    }
    return exp(x) - 1.0;
}

fn dact_elu(x: f32, beta: f32) -> f32 {
    if (x > 0.0) {
        return 1.0;
    }
    return exp(x);
}

// ELU's derivative from its output y = elu(x): 1 above 0, exp(x) = y + 1 below.
fn dact_out_elu(y: f32, beta: f32) -> f32 {
    if (y > 0.0) {
        return 1.0;
    }
    return y + 1.0;
}

fn act_relu(x: f32, beta: f32) -> f32 {
    return max(x, 0.0);
}

fn dact_relu(x: f32, beta: f32) -> f32 {
    return select(0.0, 1.0, x > 0.0);
}

// ReLU's derivative from its output: 1 where the output is positive.
fn dact_out_relu(y: f32, beta: f32) -> f32 {
    return select(0.0, 1.0, y > 0.0);
}

fn act_lipswish(x: f32, beta: f32) -> f32 {
    return x * sigmoid(beta * x) / {{LIPSWISH_DIV}};
}

fn dact_lipswish(x: f32, beta: f32) -> f32 {
    let s = sigmoid(beta * x);
    return (s + beta * x * s * (1.0 - s)) / {{LIPSWISH_DIV}};
}
