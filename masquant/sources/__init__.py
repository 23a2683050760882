"""Where models, calibration prompts and benchmark documents come from: sources registered as plugins.

``model.source=<name>`` and ``calib.source=<name>`` name a registered source (:mod:`masquant.sources.registry`);
the modules of this package register them: ``local`` (a checkpoint folder), ``tiny`` (random models of real
architectures), ``file`` and ``text`` (calibration rows), ``testbed`` (the project's testbeds, their synthetic
tasks and the checks they need). :mod:`masquant.sources.loading` loads a run's model and data through them.
"""

from masquant.sources.loading import calibration_sets, load_model_and_processor, ppl_sequences
from masquant.sources.registry import (
    CalibrationSource,
    ModelSource,
    calibration_source,
    model_source,
    register_calibration_source,
    register_check,
    register_model_source,
    register_provenance,
    register_task_documents,
    source_problems,
    source_provenance,
    task_documents,
)

__all__ = ["CalibrationSource", "ModelSource", "calibration_sets", "calibration_source", "load_model_and_processor",
           "model_source", "ppl_sequences", "register_calibration_source", "register_check", "register_model_source",
           "register_provenance", "register_task_documents", "source_problems", "source_provenance", "task_documents"]
