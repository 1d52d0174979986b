"""What each entry point imports: loading a policy or converting an ONNX model needs neither torch nor Triton.

Each check runs in a fresh interpreter: this one has imported torch long ago."""
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "triton")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _loaded_after(code: str) -> list[str]:
    out = _run(code + "\nimport sys\nprint('loaded:', *(m for m in " + repr(HEAVY) + " if m in sys.modules))")
    return out.splitlines()[-1].split()[1:]


def test_loading_a_policy_imports_neither_torch_nor_triton():
    assert _loaded_after(
        "import longattn\n"
        "from longattn.rewriter.policy import check_policy_file, load_policy\n"
        "p = load_policy(None)\n"   # the built-in policy: flash and hyper bands
        "assert p.decide('model.layers.3.self_attn', 3, 30).bands\n"
        "check_policy_file('examples/policies/hyper-last-two-thirds.yaml')\n"
        "longattn.load_policy({'version': 1, 'rules': [{'layers': '0-3', 'use': 'exact'}, {'layers': '*', 'by_length': "
        "[{'below': 4096, 'use': 'flash'}, {'use': 'hyper', 'block_size': 64}]}]})\n"
        "from longattn.plan import decode_plan, encode_plan\n"
        "assert decode_plan(encode_plan(list(p.decide('x', 0, 1).bands)))\n") == []


def test_import_longattn_alone_imports_no_torch():
    assert _loaded_after("import longattn") == []


def test_import_torch_then_longattn_registers_the_op_and_the_backend():
    # as the README has it (`import torch, longattn`); also where no pip entry point names the backend
    _run("import torch, longattn\n"
         "assert hasattr(torch.ops.longattn, 'attention')\n"
         "assert 'longattn' in torch._dynamo.list_backends(exclude_tags=())\n"
         "assert longattn.explain and longattn.Policy and longattn.kernels.Band\n")


def test_converting_an_onnx_model_imports_neither_torch_nor_triton():
    assert _loaded_after(
        "import numpy as np\n"
        "from onnx import TensorProto, helper, numpy_helper\n"
        "import longattn.onnx as lo\n"
        "F, shape = TensorProto.FLOAT, [1, 2, 6, 4]\n"
        "nodes = [helper.make_node('Transpose', ['k'], ['kt'], perm=[0, 1, 3, 2]),\n"
        "         helper.make_node('MatMul', ['q', 'kt'], ['qk']), helper.make_node('Mul', ['qk', 's'], ['sc']),\n"
        "         helper.make_node('Softmax', ['sc'], ['p'], axis=-1), helper.make_node('MatMul', ['p', 'v'], ['out'])]\n"
        "g = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info(n, F, shape) for n in 'qkv'],\n"
        "                      [helper.make_tensor_value_info('out', F, None)],\n"
        "                      [numpy_helper.from_array(np.array(0.5, np.float32), 's')])\n"
        "m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)], ir_version=9)\n"
        "policy = {'version': 1, 'rules': [{'layers': '*', 'use': 'flash'}]}\n"
        "_, report = lo.convert(m, policy=policy, check=True)\n"
        "assert report.count('rewritten') == 1, report\n") == []


def test_policy_check_on_the_command_line_imports_neither_torch_nor_triton():
    # a policy without linear bands: the linear kind's settings are checked by the kernel's own check_options
    # (kernels/linear/reference.py), which loads torch
    assert _loaded_after("from longattn.cli import main\n"
                         "assert main(['policy', 'check', 'examples/policies/hyper-last-two-thirds.yaml']) == 0\n") == []


def test_the_layer_contracts_in_pyproject_hold():
    # the same check as .ci/run's; here too so that a local pytest run catches an import across the layers
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torch_mlir_loads_only_when_an_mlir_export_runs_and_its_absence_says_how_to_get_it():
    # nothing but longattn.backends.mlir imports it (a contract in pyproject.toml), and that one lazily
    out = _run("import sys\n"
               "import longattn.mlir, longattn.backends.mlir\n"
               "from longattn.cli import main\n"
               "print('loaded:', 'torch_mlir' in sys.modules)\n"
               "sys.modules['torch_mlir'] = None  # as if not installed\n"
               "try:\n"
               "    longattn.mlir.export(None)\n"
               "except ImportError as e:\n"
               "    print('export:', e)\n"
               "import contextlib, io\n"
               "err = io.StringIO()\n"
               "with contextlib.redirect_stderr(err):\n"
               "    print('cli:', main(['export-mlir', 'llama', '--out', 'x.mlir']), err.getvalue())\n")
    assert "loaded: False" in out
    assert 'export: MLIR export needs torch-mlir: pip install "longattn[mlir]"' in out
    assert 'cli: 2 longattn: error: MLIR export needs torch-mlir: pip install "longattn[mlir]"' in out
