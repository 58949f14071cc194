//! A batch of per-sample vectors as one row-major matrix (row = sample), and
//! the GEMM shapes training needs. Dense layers over a whole batch are single
//! `dgemm` calls instead of one matrix-vector product per sample.

use matrixmultiply::dgemm;

#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_rows(rows: &[Vec<f64>], cols: usize) -> Self {
        let mut data = Vec::with_capacity(rows.len() * cols);
        for r in rows {
            data.extend_from_slice(r);
        }
        Self {
            rows: rows.len(),
            cols,
            data,
        }
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f64] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn to_rows(&self) -> Vec<Vec<f64>> {
        (0..self.rows).map(|i| self.row(i).to_vec()).collect()
    }

    /// Applies `f` to every row, producing rows of `cols` values.
    pub fn map_rows(&self, cols: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> Mat {
        let mut out = Mat::zeros(self.rows, cols);
        for i in 0..self.rows {
            let r = f(self.row(i));
            out.row_mut(i).copy_from_slice(&r);
        }
        out
    }

    pub fn add_assign(&mut self, other: &Mat) {
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
    }

    pub fn scale(&mut self, s: f64) {
        self.data.iter_mut().for_each(|v| *v *= s);
    }
}

/// `C = beta C + A B` with arbitrary strides (row stride, column stride) for A and B.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f64],
    (rsa, csa): (usize, usize),
    b: &[f64],
    (rsb, csb): (usize, usize),
    beta: f64,
    c: &mut [f64],
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v *= beta);
        return;
    }
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the asserts above keep every index the strides reach inside the
    // slices (A is m x k, B is k x n, C is m x n, all dense in one of two orders).
    unsafe {
        dgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `X W^T` for X `[rows, fin]` and W `[fout, fin]` (a dense layer without bias).
pub fn mul_wt(x: &Mat, w: &[f64], fout: usize) -> Mat {
    let fin = x.cols;
    let mut y = Mat::zeros(x.rows, fout);
    gemm(
        x.rows,
        fin,
        fout,
        &x.data,
        (fin, 1),
        w,
        (1, fin),
        0.0,
        &mut y.data,
    );
    y
}

/// `Y W` for Y `[rows, fout]` and W `[fout, fin]` (the adjoint of a dense layer).
pub fn mul_w(y: &Mat, w: &[f64], fin: usize) -> Mat {
    let fout = y.cols;
    let mut x = Mat::zeros(y.rows, fin);
    gemm(
        y.rows,
        fout,
        fin,
        &y.data,
        (fout, 1),
        w,
        (fin, 1),
        0.0,
        &mut x.data,
    );
    x
}

/// `acc += D^T X` for D `[rows, fout]`, X `[rows, fin]`: a dense weight gradient `[fout, fin]`.
pub fn add_dt_x(acc: &mut [f64], d: &Mat, x: &Mat) {
    assert_eq!(d.rows, x.rows);
    gemm(
        d.cols,
        d.rows,
        x.cols,
        &d.data,
        (1, d.cols),
        &x.data,
        (x.cols, 1),
        1.0,
        acc,
    );
}

/// Column sums of a matrix added into `acc` (bias gradients).
pub fn add_col_sums(acc: &mut [f64], d: &Mat) {
    for i in 0..d.rows {
        for (a, v) in acc.iter_mut().zip(d.row(i)) {
            *a += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_shapes_match_loops() {
        let x = Mat {
            rows: 2,
            cols: 3,
            data: vec![1.0, 2.0, 3.0, -1.0, 0.5, 4.0],
        };
        let w = [1.0, 0.0, 2.0, -1.0, 3.0, 1.0]; // [2, 3]
        let y = mul_wt(&x, &w, 2);
        assert_eq!(y.data, vec![7.0, 8.0, 7.0, 6.5]);
        let back = mul_w(&y, &w, 3);
        // row0: 7*[1,0,2] + 8*[-1,3,1] = [-1, 24, 22]
        assert_eq!(back.row(0), &[-1.0, 24.0, 22.0]);
        let mut g = vec![0.0; 6];
        add_dt_x(&mut g, &y, &x);
        // g[o][i] = sum_r y[r][o] x[r][i]
        assert_eq!(g[0], 7.0 * 1.0 + 7.0 * -1.0);
        assert_eq!(g[5], 8.0 * 3.0 + 6.5 * 4.0);
    }
}
