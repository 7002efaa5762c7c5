"""The date and the machine a benchmark ran on, as its results record them."""
import datetime
import os
import platform
import subprocess
from typing import Dict


def machine() -> Dict[str, str]:
    """The date and the machine a benchmark ran on, for its report."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import spacy
    import torch

    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "spacy": spacy.__version__,
        "torch": torch.__version__,
    }


def machine_line(info: Dict[str, str]) -> str:
    return (
        f"{info['date']}, {info['cpu']}, {info['cores']} cores, OMP_NUM_THREADS="
        f"{info['omp_num_threads']}, Python {info['python']}, spaCy {info['spacy']}, "
        f"torch {info['torch']}"
    )
