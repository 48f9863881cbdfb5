"""End to end on a real SLURM cluster: scripts/local_slurm.sh installs and starts a
single-node cluster on loopback (one fake GPU), and the workflow runs through
`--executor slurm` with the project's own profile (profiles/slurm, partition filled in
as a user would), on a real slide and on a slide whose segment job fails inside SLURM.

Needs root and apt-get (or slurm + munge already installed). Elsewhere it is skipped
with the reason, except in CI (CI=true, or WSISEG_REQUIRE_SLURM=1 as .ci/run sets),
where not running it is an error."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import CMU, REPO, corrupt_slide, needs_data
from e2e import CLASSES, MODEL, check_slide_outputs, tiny_model

pytestmark = [pytest.mark.slurm, needs_data]  # reads ../shared/data
SCRIPT = REPO / "scripts" / "local_slurm.sh"
CLUSTER = os.environ.get("LOCAL_SLURM_DIR", "/tmp/wsiseg-local-slurm")
RUN_LIMIT_S = 900  # one run of the workflow on the cluster


def cannot_run():
    if os.name != "posix" or os.geteuid() != 0:
        return "the SLURM end-to-end test starts slurmctld/slurmd/munged and needs root"
    have = all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it (slurmctld slurmd slurm-client munge)"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = cannot_run()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("WSISEG_REQUIRE_SLURM") == "1":
            pytest.fail(f"CI must run the SLURM end-to-end test, but {why}")
        pytest.skip(why)
    env = dict(os.environ, LOCAL_SLURM_DIR=CLUSTER, PATH=os.environ["PATH"] + ":/usr/sbin:/sbin")
    subprocess.run(["bash", str(SCRIPT), "install"], check=True, env=env)
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], check=True, env=env)
        env["SLURM_CONF"] = f"{CLUSTER}/etc/slurm.conf"
        # the workflow's Python (and its snakemake) first on PATH, as after 'source .venv/bin/activate'
        env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env)


def ci_profile(dst):
    """profiles/slurm with the partition filled in, as the README tells a user to do."""
    prof = yaml.safe_load(open(REPO / "profiles" / "slurm" / "config.v8+.yaml"))
    prof["default-resources"]["slurm_partition"] = "debug"
    prof["set-resources"]["segment"] = {"slurm_partition": "debug"}  # the commented FILL-IN, uncommented
    prof["latency-wait"] = 5
    dst.mkdir()
    (dst / "config.v8+.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dst


def run_on_slurm(wd, profile, configfile, env):
    """The README's login-node command, plus settings for a cluster without accounting
    (squeue as status source) and short status intervals. Stopped with SIGINT on overrun."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(wd),
        "--workflow-profile",
        str(profile),
        "--configfile",
        str(configfile),
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--seconds-between-status-checks",
        "3",
        "--slurm-keep-successful-logs",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=wd)
    try:
        out, _ = p.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)  # snakemake cancels its SLURM jobs and stops cleanly on SIGINT
        try:
            out, _ = p.communicate(timeout=60)
        finally:
            p.kill()
        raise AssertionError(f"the SLURM run took more than {RUN_LIMIT_S} s:\n{out[-6000:]}") from None
    (wd / f"run{len(list(wd.glob('run*.log'))) + 1}.log").write_text(out)
    return p.returncode, out


def jobcomp():
    """{job id: (job name, state, tres)} from the cluster's job-completion log."""
    jobs = {}
    with open(f"{CLUSTER}/log/jobcomp.log") as fh:
        for line in fh:
            f = dict(re.findall(r"(\w+)=(\S*)", line))
            jobs[f["JobId"]] = (f["Name"], f["JobState"], f.get("Tres", ""))
    return jobs


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    wd = tmp_path_factory.mktemp("slurm run")
    tiny_model(wd / "tiny.pt")
    corrupt_slide(wd / "corrupt.tif")  # readable, one damaged tile: its segment job fails (below)
    sheet = wd / "slides.tsv"
    sheet.write_text(f"slide_id\tpath\tmpp\ncmu\t{CMU}\t\ncorrupt\t{wd / 'corrupt.tif'}\t\n")
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    # device: auto (the default): on a cluster the segment job asks for a GPU by itself (the
    # profile does not force one); the node's GPU is /dev/null, so the job falls back to the CPU
    cfg.update(slides=str(sheet), device="auto")
    cfg["model"] = dict(name=MODEL, weights=str(wd / "tiny.pt"), classes=CLASSES, mpp=0.5)
    # one worker: segment asks for 2 CPUs, the node's 2 cores; no unreadable tile allowed
    cfg["tiling"].update(tile_size=256, batch_size=4, workers=1, max_unreadable_fraction=0)
    cfgfile = wd / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    profile = ci_profile(wd / "profile")
    rc1, out1 = run_on_slurm(wd, profile, cfgfile, cluster)
    summary = wd / "results" / MODEL / "summary.csv"
    if summary.exists():  # written on the login node after the failed job (onerror)
        shutil.copyfile(summary, wd / "first-summary.csv")
    # resume as the README says: take the bad slide out of the sheet, same command again
    sheet.write_text(f"slide_id\tpath\tmpp\ncmu\t{CMU}\t\n")
    rc2, out2 = run_on_slurm(wd, profile, cfgfile, cluster)
    return wd, (rc1, out1), (rc2, out2)


def submitted(out):
    """{SLURM job id: Snakemake's description} of the jobs a run submitted."""
    return dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$", out, re.M))


def test_good_slide_done_through_slurm_and_checked(slurm_run):
    wd, (rc1, out1), (rc2, out2) = slurm_run
    assert rc2 == 0, out2[-6000:]
    check_slide_outputs(wd, "cmu", CMU)
    summary = pd.read_csv(wd / "results" / MODEL / "summary.csv")
    assert summary["slide_id"].tolist() == ["cmu"] and summary["status"].tolist() == ["ok"]
    assert summary.loc[0, "n_tiles"] > 0 and summary.loc[0, "tiles_unreadable"] == 0


def test_jobs_really_ran_in_slurm(slurm_run, cluster):
    wd, (rc1, out1), (rc2, out2) = slurm_run
    jobs = submitted(out1)
    comp = jobcomp()
    assert jobs and set(jobs) <= set(comp), (jobs, comp)
    # every per-slide step went through SLURM: prep (tissue+plan, both slides in one job),
    # segment (one per slide, with the GPU; the bad slide's tried twice), post (stitch+stats);
    # inspect/triage/aggregate are local
    kinds = sorted(re.search(r"slurm_logs/(group_prep|group_post|rule_segment)", p).group(1) for p in jobs.values())
    assert kinds == ["group_post", "group_prep"] + ["rule_segment"] * 3, jobs
    for jid, log in jobs.items():
        name, state, tres = comp[jid]
        want = "FAILED" if "rule_segment/corrupt" in log else "COMPLETED"
        assert state == want, (jid, log, comp[jid])
        if "rule_segment" in log:  # the GPU was asked for with the plugin's gpu resource
            job = subprocess.run(
                ["scontrol", "show", "job", "-o", jid], env=cluster, capture_output=True, text=True
            ).stdout
            assert "TresPerJob=gres:gpu:1" in job and "cpu=2," in tres, (job, tres)
    # the retry asked for twice the memory (resources grow with the attempt)
    mems = [re.search(r"mem=(\d+)M", comp[j][2]).group(1) for j, p in jobs.items() if "rule_segment/corrupt" in p]
    assert mems == ["8000", "16000"], mems
    # the SLURM logs are kept; the one prep job did both slides (group-components)
    assert all(os.path.exists(p) for p in jobs.values())
    prep = open(next(p for p in jobs.values() if "group_prep" in p)).read()
    assert all(f"rule {r}:" in prep for r in ("tissue", "plan")) and "slide=cmu" in prep and "slide=corrupt" in prep
    # inside the segment job, SLURM's (fake) GPU was visible, and the model fell back to the CPU
    seg = (wd / "results" / MODEL / "cmu" / "logs" / "segment.log").read_text()
    assert "the job was given GPU 0" in seg and "running the model on the CPU" in seg
    # the resumed run submitted nothing new: only the local triage and aggregate ran
    assert not submitted(out2), out2[-4000:]


def test_failed_slurm_job_shows_reason_and_batch_goes_on(slurm_run):
    wd, (rc1, out1), _ = slurm_run
    assert rc1 != 0  # the run reports the failure ...
    assert re.search(r"Error in rule segment", out1), out1[-6000:]
    # ... with the reason from the job's own log, naming the slide and the fix
    assert "slide 'corrupt'" in out1 and "max_unreadable_fraction" in out1, out1[-6000:]
    # ... and under keep-going the good slide was finished in that same run
    assert "rule stats" in out1 and (wd / "results" / MODEL / "cmu" / "stats.csv").exists()
    assert not (wd / "results" / MODEL / "corrupt" / "mask.ome.tif").exists()
    # ... and summary.csv written on the login node all the same, the failed slide explained
    first = pd.read_csv(wd / "first-summary.csv", keep_default_na=False).set_index("slide_id")
    assert first["status"].to_dict() == dict(cmu="ok", corrupt="failed")
    assert (
        first.loc["corrupt", "failed_stage"] == "segment" and "max_unreadable_fraction" in first.loc["corrupt", "error"]
    )
    assert "wsiseg: FAILED corrupt [segment]: slide 'corrupt'" in out1
