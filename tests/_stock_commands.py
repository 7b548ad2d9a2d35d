"""Running stock nnU-Net (and nnunetv2_dsm) commands in subprocesses from tests."""

import subprocess


def run_command(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output tail when it exits non-zero."""
    if "nnUNetv2_plan" in args[0]:
        # nnU-Net's planner passes this value to torch.set_num_threads, which rejects 0.
        env = {**env, "nnUNet_n_proc_DA": "2"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out
