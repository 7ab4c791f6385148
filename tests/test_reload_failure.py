"""Issue 18 item 7: a reload that fails leaves the serving version(s) in place (Triton's rule).

The load RPC still reports the error; inference keeps answering on the old instance and the repository
index keeps showing it READY. A version that loads fine on the next reload replaces the old one.
"""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import EXPLICIT


def _infer(c: grpcclient.InferenceServerClient, model: str = "flip") -> np.ndarray:
    x = grpcclient.InferInput("INPUT0", [2, 64], "FP32")
    x.set_data_from_numpy(np.ones((2, 64), np.float32))
    return c.infer(model, [x]).as_numpy("OUTPUT0")


def _index(c: grpcclient.InferenceServerClient) -> dict:
    return {(m.name, m.version): m.state for m in c.get_model_repository_index().models}


def test_reload_of_a_corrupted_version_keeps_the_serving_one(tmp_path, serve_repo):
    models.copy_example(tmp_path, "flip")
    s = serve_repo(tmp_path, metrics=False, **EXPLICIT)
    with grpcclient.InferenceServerClient(s.url) as c:
        expected = _infer(c)
        (tmp_path / "flip" / "1" / "model.onnx").write_bytes(b"")  # the file on disk breaks
        with pytest.raises(InferenceServerException) as e:
            c.load_model("flip")
        assert "flip" in e.value.message()  # the load RPC reports the failure ...
        assert c.is_model_ready("flip")  # ... and the serving instance stays
        np.testing.assert_array_equal(_infer(c), expected)
        assert _index(c) == {("flip", "1"): "READY"}
        # a later reload that works replaces the old instance
        models.copy_example(tmp_path / "fixed", "flip")
        (tmp_path / "flip" / "1" / "model.onnx").write_bytes((tmp_path / "fixed" / "flip" / "1" / "model.onnx").read_bytes())
        c.load_model("flip")
        np.testing.assert_array_equal(_infer(c), expected)
        assert _index(c) == {("flip", "1"): "READY"}


def test_reload_whose_new_version_fails_keeps_the_version_it_would_replace(tmp_path, serve_repo):
    models.copy_example(tmp_path, "flip")  # default version policy: latest 1
    s = serve_repo(tmp_path, metrics=False, **EXPLICIT)
    with grpcclient.InferenceServerClient(s.url) as c:
        expected = _infer(c)
        (tmp_path / "flip" / "2").mkdir()
        (tmp_path / "flip" / "2" / "model.onnx").write_bytes(b"")
        with pytest.raises(InferenceServerException):
            c.load_model("flip")
        assert c.is_model_ready("flip") and c.is_model_ready("flip", "1")
        np.testing.assert_array_equal(_infer(c), expected)
        assert _index(c) == {("flip", "1"): "READY", ("flip", "2"): "UNAVAILABLE"}


def test_first_load_that_fails_reports_unavailable(tmp_path, serve_repo):
    models.copy_example(tmp_path, "mlp")
    s = serve_repo(tmp_path, metrics=False, **EXPLICIT)
    models.copy_example(tmp_path, "flip")
    (tmp_path / "flip" / "1" / "model.onnx").write_bytes(b"")
    with grpcclient.InferenceServerClient(s.url) as c:
        with pytest.raises(InferenceServerException):
            c.load_model("flip")
        assert not c.is_model_ready("flip")
        assert _index(c)[("flip", "1")] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException) as e:
            _infer(c)
        assert e.value.status() == "StatusCode.UNAVAILABLE"
