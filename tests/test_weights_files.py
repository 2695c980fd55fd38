"""What diffcore writes is reproducible: the same tensors and metadata give the same bytes."""

import subprocess
import sys

from safetensors import safe_open


def test_safetensors_files_are_byte_identical_across_processes(tmp_path):
    # safetensors keeps metadata in a hash map seeded per process: without sorting, the header order
    # (and so the file's bytes) differs from one process to the next
    code = (
        "import sys, torch\n"
        "from diffcore.weights import save_safetensors\n"
        "save_safetensors({'b': torch.zeros(2), 'a': torch.arange(3.0)}, sys.argv[1],"
        " {f'key{i}': f'v{i}' for i in range(12)})\n"
    )
    files = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    blobs = [f.read_bytes() for f in files]
    assert blobs[0] == blobs[1] == blobs[2]
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {f"key{i}": f"v{i}" for i in range(12)}
        assert f.get_tensor("a").tolist() == [0.0, 1.0, 2.0]
