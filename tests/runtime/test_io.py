"""Atomic files and folders, and the random-number states a checkpoint holds (lit_rlhf/io.py)."""

import warnings
from pathlib import Path

import pytest
import torch

from lit_rlhf.runtime import io
def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    io.atomic_write(target, "first")
    io.atomic_write(target, b"second")
    assert target.read_text() == "second"

    def dies(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, dies)
    assert target.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~io.current_umask())


def test_atomic_directory_replaces_or_keeps_the_first_build(tmp_path):
    target = tmp_path / "adapter"

    def writer(text):
        return lambda folder: (Path(folder) / "weights").write_text(text)

    assert io.atomic_directory(target, writer("one"))
    assert io.atomic_directory(target, writer("two"))  # replace=True swaps the folder
    assert (target / "weights").read_text() == "two"
    assert not io.atomic_directory(target, writer("three"), replace=False)  # another build already finished
    assert (target / "weights").read_text() == "two"

    def dies(folder):
        (Path(folder) / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_directory(target, dies)
    assert (target / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


class FakeCuda:
    """Stands in for torch.cuda on a machine without a GPU: two devices with their own generator states."""

    def __init__(self, devices: int = 2):
        self.states = [torch.tensor([1, 2, 3], dtype=torch.uint8) + 3 * i for i in range(devices)]

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_rng_state_all)

    def set_rng_state_all(self, states):
        # as torch's: state i goes to device i (a device that does not exist is an error)
        for i, state in enumerate(states):
            if i >= len(self.states):
                raise RuntimeError(f"CUDA error: invalid device ordinal {i}")
            self.states[i] = state.clone()


def test_rng_state_holds_and_restores_every_cuda_generator(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    state = io.rng_state()
    assert [s.tolist() for s in state["cuda"]] == [[1, 2, 3], [4, 5, 6]]
    cpu_draw = torch.rand(3)
    cuda.states = [torch.zeros(3, dtype=torch.uint8)] * 2  # the run went on and drew from the GPUs
    io.set_rng_state(state)
    assert [s.tolist() for s in cuda.states] == [[1, 2, 3], [4, 5, 6]]
    assert torch.equal(torch.rand(3), cpu_draw)  # and the CPU stream is back where it was


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path, monkeypatch):
    FakeCuda().install(monkeypatch)
    io.atomic_torch_save({"rng": io.rng_state()}, tmp_path / "x.ckpt")
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)["rng"]
    assert [s.tolist() for s in loaded["cuda"]] == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("saved, here", [(8, 4), (2, 3)])
def test_cuda_states_of_another_device_count_restore_what_matches_with_one_warning(saved, here, monkeypatch):
    # a checkpoint written with 8 visible GPUs, resumed with 4 (and 2 resumed with 3)
    saver = FakeCuda(saved)
    saver.install(monkeypatch)
    state = io.rng_state()
    cpu_draw = torch.rand(3)
    resumer = FakeCuda(here)
    resumer.states = [torch.zeros(3, dtype=torch.uint8) for _ in range(here)]  # this machine's own streams
    resumer.install(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io.set_rng_state(state)
    (warning,) = [w for w in caught if "CUDA random states" in str(w.message)]
    assert f"of {saved} devices, this process sees {here}" in str(warning.message)
    assert "not bit-exact" in str(warning.message) and "CUDA_VISIBLE_DEVICES" in str(warning.message)
    matched = min(saved, here)
    assert [s.tolist() for s in resumer.states[:matched]] == [s.tolist() for s in saver.states[:matched]]
    assert all(s.tolist() == [0, 0, 0] for s in resumer.states[matched:])  # no saved state: left as they were
    assert torch.equal(torch.rand(3), cpu_draw)  # the CPU stream is restored exactly


def test_cuda_states_of_the_same_device_count_restore_without_a_warning(monkeypatch):
    FakeCuda().install(monkeypatch)
    state = io.rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        io.set_rng_state(state)


def test_module_checkpoints_hold_the_cuda_rng_state(monkeypatch):
    from lit_rlhf.modules import PPOModule

    module = PPOModule(log_samples_every=0, export_adapter=False)
    FakeCuda().install(monkeypatch)
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    assert [s.tolist() for s in checkpoint["lit_rlhf"]["rng"]["cuda"]] == [[1, 2, 3], [4, 5, 6]]


def test_module_resumes_a_checkpoint_of_8_gpus_on_4(monkeypatch):
    from lit_rlhf.modules import PPOModule

    module = PPOModule(log_samples_every=0, export_adapter=False)
    saver = FakeCuda(8)
    saver.install(monkeypatch)
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    resumer = FakeCuda(4)
    resumer.states = [torch.zeros(3, dtype=torch.uint8) for _ in range(4)]
    resumer.install(monkeypatch)
    with pytest.warns(UserWarning, match="not bit-exact"):
        module.on_load_checkpoint(checkpoint)
    assert [s.tolist() for s in resumer.states] == [s.tolist() for s in saver.states[:4]]
