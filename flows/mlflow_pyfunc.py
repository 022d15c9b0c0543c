"""The MLflow model of an executed candidate, logged as "model from code": MLflow stores this file beside the
candidate's model.pt2, so loading the model needs mlflow, torch and numpy, not deployfit, and unpickles nothing.
`predict` runs the exported program on a float32 batch (any batch size: the program's batch is dynamic) and
returns its outputs as an array."""
import mlflow
import numpy as np
import torch


class ExportedProgramModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        try:  # an INT8 program calls the quantized_decomposed operators this module registers
            import torch.ao.quantization.fx._decomposed  # noqa: F401
        except ImportError:
            pass
        self.module = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.module(x).numpy()


mlflow.models.set_model(ExportedProgramModel())
