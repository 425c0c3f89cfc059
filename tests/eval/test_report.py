"""The device line every benchmark and report prints: a CPU number names its CPU."""

import torch

from moeforge.eval import report

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC   7B13 64-Core Processor
flags\t\t: fpu avx2

processor\t: 1
model name\t: AMD EPYC   7B13 64-Core Processor
"""


def test_cpu_model_reads_the_first_model_name_and_tidies_its_spaces():
    assert report.cpu_model(CPUINFO) == "AMD EPYC 7B13 64-Core Processor"
    assert report.cpu_model("processor\t: 0\nflags\t: avx\n") is None  # e.g. some ARM kernels
    assert report.cpu_model("model name\t:   \n") is None


def test_cpu_line_names_model_and_instruction_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(report, "cpu_model", lambda cpuinfo=None: "Some CPU 9000")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    line = report.device_description()
    assert line.startswith("CPU: Some CPU 9000, ") and ", AVX512, " in line
    assert f"torch {torch.__version__}" in line
    monkeypatch.setattr(report, "cpu_model", lambda cpuinfo=None: None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    line = report.device_description()
    assert "None" not in line and "DEFAULT" not in line and " cores, torch " in line
