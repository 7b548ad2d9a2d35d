"""The one dataset model: roles follow the prompt name everywhere (training, baselines, evaluation)."""

import pytest

from nnunetv2_dsm.dataset import DSMDataset, DSMDatasetError
from nnunetv2_dsm.evaluation.cases import load_dataset_labels
from nnunetv2_dsm.evaluation.maxlogit import organ_channels as maxlogit_organs

DATASET_JSON = {
    "labels": {"background": 0, "my_liver": [1, 2], "hcc": 2, "spleen": 3, "ignore": 9},
    "dsm": {"prompts": {"my_liver": "liver", "hcc": "liver_tumor"},
            "class_availability": {"case_1": ["my_liver", "hcc"]}},
    "file_ending": ".nii.gz",
}


def test_roles_follow_the_prompt_name_in_every_consumer():
    dataset = DSMDataset.from_json(DATASET_JSON)
    assert list(dataset.classes) == ["my_liver", "hcc", "spleen"]
    assert dataset.classes["my_liver"] == (1, 2) and dataset.ignore_label == 9
    assert dataset.organs == ["my_liver", "spleen"] and dataset.is_tumour("hcc")
    assert dataset.parent_organs("hcc") == ["my_liver"]
    assert dataset.available("case_1") == {"my_liver", "hcc"} and dataset.available("other") == set(dataset.classes)
    # stage-2 training, the anomaly baselines and the evaluation agree
    assert dataset.organ_channels == [0, 2]
    assert maxlogit_organs(DATASET_JSON, 3) == [0, 2]
    assert load_dataset_labels(DATASET_JSON).organs == ["my_liver", "spleen"]


def test_bad_dataset_json_is_one_clear_error():
    with pytest.raises(DSMDatasetError, match="x.json: label 'liver' has id 'one'"):
        DSMDataset.from_json({"labels": {"background": 0, "liver": "one"}}, "x.json")
    with pytest.raises(DSMDatasetError, match="no foreground class"):
        DSMDataset.from_json({"labels": {"background": 0}})
    with pytest.raises(DSMDatasetError, match=r"lists \['kidney'\], which are not labels"):
        DSMDataset.from_json({"labels": {"background": 0, "liver": 1},
                              "dsm": {"class_availability": {"c": ["kidney"]}}})
