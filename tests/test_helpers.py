"""The shared small helpers: one SM count, one dtype name, one cache directory, one interpreter check."""
import torch

from fdpp.kernels.device import interpreting, num_sms, upcast_bf16_dot
from fdpp.utils import cache_dir, dtype_name


def test_num_sms_off_cuda_is_one_processor():
    assert num_sms(torch.device("cpu")) == 1


def test_dtype_names():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(torch.int8) == "int8"
    assert dtype_name("torch.float16") == dtype_name("fp16") == dtype_name("half") == "float16"


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FDPP_CACHE_DIR", str(tmp_path))
    assert cache_dir("calibration") == str(tmp_path / "calibration")
    monkeypatch.delenv("FDPP_CACHE_DIR")
    assert cache_dir().endswith("/.cache/fdpp")


def test_upcast_only_bf16_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting() and upcast_bf16_dot(torch.bfloat16) and not upcast_bf16_dot(torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not upcast_bf16_dot(torch.bfloat16)
