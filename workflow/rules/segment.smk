rule segment:
    """GPU rule: stream the tile plan through the U-Net into a chunked label store."""
    input:
        slide=get_slide_input,  # the example slide only: others are read by params.path
        plan=f"{RESULTS}/{{slide}}/plan.tsv",
        plan_json=f"{RESULTS}/{{slide}}/plan.json",
        tissue=f"{RESULTS}/{{slide}}/tissue.png",
        weights=get_model_weights,
    output:
        store=temp(directory(f"{RESULTS}/{{slide}}/work/labels.store")),
        json=f"{RESULTS}/{{slide}}/work/segment.json",
    log:
        slide_log("segment"),
    benchmark:
        slide_benchmark("segment")
    conda:
        "../../envs/torch.yaml"
    threads: segment_threads()
    resources:
        gpu=segment_resources_gpu,  # 1 for a U-Net on a cluster (device auto/cuda), 0 for device cpu or the classical model
        cpus_per_task=lambda wildcards, threads: threads,  # segment_threads(): network streams, or reading + the network + post-processing
        mem_mb=segment_mem_mb,  # grows with the job's CPUs (a network stream each on the CPU) and the tile size
        runtime=segment_runtime,  # minutes, from the slide's tile count
    params:  # what changes the mask; batch size, workers, amp, device come from the config (rerun nothing)
        path=get_slide_path,
        mpp=get_slide_mpp,
        model=model_cfg(),
        clip=config["tissue"]["clip_mask"],
        weights_sha256=weights_sha256(),
    script:
        "../../scripts/segment.py"
