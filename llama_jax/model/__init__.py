"""The model: `config` (ModelConfig, SIZES; pure Python), `llama` (the layers and the Llama
module), `attention` (the attention implementations behind one dispatch) and `sizes` (parameter
counts, FLOPs per token, model shapes)."""
