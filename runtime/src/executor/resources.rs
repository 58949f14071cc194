//! Buffers and bind groups of one batch size, allocated on first use and cached (the least
//! recently used set is evicted beyond [`CACHED_BATCH_SIZES`]).

use super::*;

impl GpuExecutor {
    /// Index into `self.cache` of the buffers for `batch`, allocating (and evicting the least
    /// recently used set) when needed.
    pub(super) fn resources(&mut self, batch: usize) -> Result<usize> {
        self.use_counter += 1;
        if let Some(i) = self.cache.iter().position(|r| r.set.batch == batch) {
            self.cache[i].last_used = self.use_counter;
            return Ok(i);
        }
        if self.cache.len() >= CACHED_BATCH_SIZES {
            let oldest = (0..self.cache.len())
                .min_by_key(|&i| self.cache[i].last_used)
                .expect("cache is not empty");
            self.cache.swap_remove(oldest);
        }
        let device = &self.gpu.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let set = BufferSet::allocate(&self.gpu, &self.plan, batch, &self.weights)?;
        let kernel_groups = self
            .plan
            .kernels
            .iter()
            .zip(&self.kernels)
            .map(|(decl, kernel)| {
                let buffers: Vec<&wgpu::Buffer> = decl
                    .bindings
                    .iter()
                    .map(|name| &set.buffers[self.buffer_index(name)])
                    .collect();
                device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(&decl.name),
                    layout: &kernel.layout,
                    entries: &entries(&buffers),
                })
            })
            .collect();
        let mut fill_groups = HashMap::new();
        let mut staging = HashMap::new();
        for program in self.programs.values() {
            for op in &program.ops {
                if let Op::Fill { buffer, value } = *op {
                    let key = (buffer, value.to_bits());
                    fill_groups.entry(key).or_insert_with(|| {
                        device.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some("fill"),
                            layout: &self.fill_kernel.layout,
                            entries: &entries(&[&set.buffers[buffer], &self.fill_values[&key.1]]),
                        })
                    });
                }
            }
            for (_, buffer) in &program.outputs {
                staging.entry(*buffer).or_insert_with(|| {
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("read-back"),
                        size: set.buffers[*buffer].size(),
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                });
            }
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(RuntimeError::Gpu(format!(
                "allocating buffers for batch {batch}: {}",
                wgpu_error(&e)
            )));
        }
        self.gpu.take_errors()?;
        self.cache.push(BatchResources {
            set,
            kernel_groups,
            fill_groups,
            staging,
            last_used: self.use_counter,
        });
        Ok(self.cache.len() - 1)
    }
}
