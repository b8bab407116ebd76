"""MLflow "model from code" for a TopK SAE: no pickled Python object, weights are safetensors.

predict(x) takes raw activations, an (n, d_in) float array, and returns the dense (n, n_latents)
float32 codes; predict(x, params={"output": "reconstruction"}) returns the (n, d_in) reconstructions.
The `sae` package travels with the model (code_paths), so loading needs torch and safetensors but
not saeflow itself.
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class TopKSAEModel(PythonModel):
    def load_context(self, context):
        from sae.model import TopKSAE

        self.sae = TopKSAE.load(context.artifacts["sae"]).eval()

    # the hint tells MLflow the input is an array (no schema inferred from it: the signature is logged)
    def predict(self, context, model_input: np.ndarray, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        output = (params or {}).get("output", "codes")
        if output not in ("codes", "reconstruction"):
            raise ValueError(f"params output={output!r}: use codes or reconstruction")
        with torch.no_grad():
            if output == "reconstruction":
                return self.sae(x).numpy()
            codes = self.sae.encode(x)
        return codes.dense(self.sae.cfg.n_latents).numpy()


mlflow.models.set_model(TopKSAEModel())
