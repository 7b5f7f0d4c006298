//! The runtime's contract: round trips, batching, grid folding, pool reuse, limits, profiling.

mod common;

use common::{gpu, Rng};
use ldm_wgpu::kernels::fill;
use ldm_wgpu::runtime::grid_1d;
use ldm_wgpu::{DType, Error, Gpu, GpuOptions};

#[test]
fn upload_download_round_trip_f32_and_f16() {
    let g = gpu();
    let mut rng = Rng::new(1);
    for &n in &[1usize, 3, 255, 257, 10_007] {
        let data = rng.normals(n, 3.0);
        let t = g.upload(&data, &[n], DType::F32).unwrap();
        assert_eq!(
            g.download(&t).unwrap(),
            data,
            "f32 round trip is exact (n = {n})"
        );
        if g.caps.shader_f16 {
            let t = g.upload(&data, &[n], DType::F16).unwrap();
            let back = g.download(&t).unwrap();
            let want: Vec<f32> = data
                .iter()
                .map(|&x| half::f16::from_f32(x).to_f32())
                .collect();
            assert_eq!(back, want, "f16 round trip equals host rounding (n = {n})");
        }
    }
}

#[test]
fn upload_rejects_wrong_length() {
    let err = gpu().upload(&[1.0, 2.0], &[3], DType::F32).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
}

#[test]
fn many_dispatches_one_submit() {
    // A private engine so no other test's work is counted.
    let g = Gpu::new(&GpuOptions::from_env().unwrap()).unwrap();
    let t = g.empty(&[1000], DType::F32).unwrap();
    let before = g.stats();
    for i in 0..200 {
        fill::fill(&g, &t, i as f32).unwrap();
    }
    let mid = g.stats();
    assert_eq!(mid.dispatches - before.dispatches, 200);
    assert_eq!(mid.submits, before.submits, "recording must not submit");
    let out = g.download(&t).unwrap();
    assert!(out.iter().all(|&x| x == 199.0), "dispatches ran in order");
    assert_eq!(
        g.stats().submits - before.submits,
        1,
        "200 dispatches + readback = one submit"
    );
    assert_eq!(
        g.stats().pipelines_compiled,
        1,
        "the pipeline compiled once"
    );
}

#[test]
fn grid_folding_covers_large_1d_grids() {
    assert_eq!(grid_1d(10), [10, 1, 1]);
    assert_eq!(grid_1d(65_535), [65_535, 1, 1]);
    for total in [65_536u64, 100_000, 4_000_000] {
        let [x, y, _] = grid_1d(total);
        assert!(x <= 65_535 && y <= 65_535);
        assert!(x as u64 * y as u64 >= total && (x as u64) * (y as u64 - 1) < total);
    }
    // 70,000 workgroups of 256 = 17.9M elements: needs the second dimension.
    let g = gpu();
    let n = 70_000 * 256 + 5;
    let t = g.empty(&[n], DType::F32).unwrap();
    fill::fill(g, &t, 0.0).unwrap();
    fill::fill(g, &t, 2.5).unwrap();
    let out = g.download(&t).unwrap();
    assert!(
        out.iter().all(|&x| x == 2.5),
        "every element written past 65,535 workgroups"
    );
}

#[test]
fn pool_reuses_buffers_in_a_steady_loop() {
    let g = Gpu::new(&GpuOptions::from_env().unwrap()).unwrap();
    let step = |g: &Gpu| {
        let a = g.empty(&[4, 64, 64, 320], DType::F32).unwrap();
        fill::fill(g, &a, 1.0).unwrap();
        let b = g.empty(&[4, 64, 64, 320], DType::F32).unwrap();
        fill::fill(g, &b, 2.0).unwrap();
        let c = g.empty(&[77, 768], DType::F32).unwrap();
        fill::fill(g, &c, 3.0).unwrap();
        g.flush().unwrap();
    };
    step(&g); // warm-up
    let warm = g.pool_stats();
    for _ in 0..10 {
        step(&g);
    }
    let after = g.pool_stats();
    assert_eq!(after.created, warm.created, "no new buffers after warm-up");
    assert_eq!(after.live_buffers, 0);
    assert_eq!(after.live_bytes, 0);
    assert!(after.reused >= warm.reused + 30);
    let t = g.empty(&[10], DType::F32).unwrap();
    assert_eq!(g.pool_stats().live_buffers, 1);
    assert!(g.pool_stats().live_bytes >= 40);
    drop(t);
    assert_eq!(g.pool_stats().live_buffers, 0);
}

#[test]
fn tensors_beyond_the_binding_limit_are_refused_with_a_hint() {
    let g = gpu();
    let limit = g.caps.max_storage_binding;
    let n = (limit / 4 + 64) as usize;
    let err = g.empty(&[n], DType::F32).unwrap_err();
    match &err {
        Error::LimitExceeded {
            limit: l,
            requested,
            ..
        } => {
            assert_eq!(*l, limit);
            assert!(*requested > limit);
        }
        other => panic!("expected LimitExceeded, got {other}"),
    }
    assert!(err.to_string().contains("exceeds the device limit"));
    assert!(err.hint().unwrap().contains("tiled"));
    // Exactly at the limit is fine (the VAE's last block at 512x512 in f32 is 128 MiB).
    assert!(g.empty(&[(limit / 4) as usize], DType::F32).is_ok());
}

#[test]
fn profiling_table_reports_each_kernel() {
    let g = Gpu::new(&GpuOptions {
        profile: true,
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap();
    if !g.caps.timestamps {
        eprintln!("adapter has no TIMESTAMP_QUERY: profiling not testable here");
        return;
    }
    let t = g.empty(&[1 << 20], DType::F32).unwrap();
    for _ in 0..5 {
        fill::fill(&g, &t, 1.0).unwrap();
    }
    let table = g.profile().unwrap();
    let fill_time = table.get("fill").expect("fill row");
    assert_eq!(fill_time.calls, 5);
    assert!(fill_time.total_ns > 0.0);
    assert_eq!(fill_time.bytes, 5.0 * 4.0 * (1 << 20) as f64);
    let text = ldm_wgpu::runtime::timing::format_table(&table);
    assert!(text.contains("fill") && text.contains("GB/s"), "{text}");
}

#[test]
fn unknown_adapter_is_a_clear_error() {
    let err = Gpu::new(&GpuOptions {
        adapter: Some("no-such-gpu-xyz".into()),
        ..GpuOptions::from_env().unwrap()
    })
    .err()
    .expect("must fail");
    assert!(matches!(err, Error::AdapterNotFound { .. }), "{err}");
    assert!(err.hint().unwrap().contains("ldm info"));
}

#[test]
fn reshape_checks_element_count() {
    let t = gpu().empty(&[2, 3, 4], DType::F32).unwrap();
    assert_eq!(t.reshape(&[6, 4]).unwrap().shape(), &[6, 4]);
    assert!(t.reshape(&[5, 5]).is_err());
}

#[test]
fn bind_groups_are_cached_by_pipeline_buffers_and_ring_slot() {
    let g = Gpu::new(&GpuOptions::from_env().unwrap()).unwrap();
    let t = g.empty(&[1000], DType::F32).unwrap();
    let s0 = g.stats();
    fill::fill(&g, &t, 1.0).unwrap();
    g.flush().unwrap();
    fill::fill(&g, &t, 2.0).unwrap(); // same pipeline, buffer and ring slot (the ring restarts at a flush)
    g.flush().unwrap();
    let s1 = g.stats();
    assert_eq!(
        s1.bind_groups_created - s0.bind_groups_created,
        1,
        "the same dispatch twice: one creation"
    );
    assert_eq!(s1.bind_groups_reused - s0.bind_groups_reused, 1);
    assert_eq!(
        g.download(&t).unwrap()[999],
        2.0,
        "the reused bind group binds the same buffer"
    );

    // A tensor that gets the same pool buffer back has the same id and hits the cache.
    let id = t.buffer_id();
    drop(t);
    let u = g.empty(&[1000], DType::F32).unwrap();
    assert_eq!(u.buffer_id(), id, "the buffer id survives recycling");
    fill::fill(&g, &u, 3.0).unwrap();
    g.flush().unwrap();
    let s2 = g.stats();
    assert_eq!(s2.bind_groups_created, s1.bind_groups_created);
    assert_eq!(g.download(&u).unwrap()[0], 3.0);

    // Another ring slot (a second dispatch before the flush) or another buffer is another bind group.
    let v = g.empty(&[1000], DType::F32).unwrap();
    fill::fill(&g, &u, 4.0).unwrap();
    fill::fill(&g, &v, 5.0).unwrap();
    g.flush().unwrap();
    let s3 = g.stats();
    assert_eq!(
        s3.bind_groups_reused - s2.bind_groups_reused,
        1,
        "slot 0 with u hits"
    );
    assert_eq!(
        s3.bind_groups_created - s2.bind_groups_created,
        1,
        "slot 1 with v is new"
    );
    assert_eq!(
        (g.download(&u).unwrap()[5], g.download(&v).unwrap()[5]),
        (4.0, 5.0)
    );

    // trim_pool frees v's buffer once v is gone, and with it the bind groups that bind it.
    let cached = s3.bind_groups_cached;
    drop(v);
    g.trim_pool();
    assert_eq!(
        g.stats().bind_groups_cached,
        cached - 1,
        "the bind group of the freed buffer is evicted"
    );
    fill::fill(&g, &u, 6.0).unwrap();
    g.flush().unwrap();
    assert_eq!(
        g.stats().bind_groups_reused - s3.bind_groups_reused,
        1,
        "live buffers keep their bind groups"
    );
}

#[test]
fn pool_hands_out_the_same_buffers_whatever_the_order_they_were_freed_in() {
    let g = Gpu::new(&GpuOptions::from_env().unwrap()).unwrap();
    let ids = |ts: &[ldm_wgpu::Tensor]| ts.iter().map(|t| t.buffer_id()).collect::<Vec<_>>();
    let a: Vec<_> = (0..4)
        .map(|_| g.empty(&[64], DType::F32).unwrap())
        .collect();
    let first = ids(&a);
    drop(a); // dropped front to back
    let b: Vec<_> = (0..4)
        .map(|_| g.empty(&[64], DType::F32).unwrap())
        .collect();
    assert_eq!(ids(&b), first);
    for t in b.into_iter().rev() {
        drop(t); // back to front
    }
    let c: Vec<_> = (0..4)
        .map(|_| g.empty(&[64], DType::F32).unwrap())
        .collect();
    assert_eq!(
        ids(&c),
        first,
        "a steady loop gets the same buffers (and bind groups) every step"
    );
}

#[test]
fn copy_bytes_records_a_copy_without_submitting() {
    let g = Gpu::new(&GpuOptions::from_env().unwrap()).unwrap();
    let src = g
        .upload(
            &(0..16).map(|i| i as f32).collect::<Vec<_>>(),
            &[16],
            DType::F32,
        )
        .unwrap();
    let dst = g.empty(&[4], DType::F32).unwrap();
    fill::fill(&g, &dst, -1.0).unwrap();
    let before = g.stats().submits;
    g.copy_bytes(&src, 8 * 4, &dst, 4, 2 * 4).unwrap();
    assert_eq!(
        g.stats().submits,
        before,
        "recording a copy must not submit"
    );
    assert_eq!(
        g.download(&dst).unwrap(),
        vec![-1.0, 8.0, 9.0, -1.0],
        "ordered after the fill"
    );
    assert!(
        g.copy_bytes(&src, 2, &dst, 0, 4).is_err(),
        "unaligned offset"
    );
    assert!(
        g.copy_bytes(&src, 60, &dst, 0, 8).is_err(),
        "past the end of src"
    );
    assert!(g.copy_bytes(&src, 0, &src, 16, 8).is_err(), "same buffer");
}
