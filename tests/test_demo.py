"""The main job's embedded default runs end to end and its numbers make sense."""
import json

from engine.pipelines import demo


def test_demo_end_to_end(tmp_path):
    demo.main(["--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    err = report["solver_rms_error"]
    assert err["order 2"][0] > err["order 2"][1] > err["order 2"][2]
    assert err["order 3 (CMT/upstream)"][1] < err["order 2"][1]  # 16 NFE, the CMT operating point
    assert report["trajectory_endpoint_rms_to_nearest_digit"] < 0.1
    assert report["network_parameters"]["cifar10-ddpmpp"] == 55_732_739
    assert report["dataset_images"] == 1797
    for name in ("trajectories.png", "consistency_1_and_2_step.png", "digits-16x16.zip",
                 "digits-ddpmpp.safetensors"):
        assert (tmp_path / name).stat().st_size > 0
