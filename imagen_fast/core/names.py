"""Names and conventions shared by the torch and JAX paths."""

# Samplers of a whole sampling loop (imagen_fast.diffusion.sample, imagen_fast.jax.diffusion):
# "ddpm" ancestral, "ddim" (with eta), "dpmpp2m" DPM-Solver++(2M).
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
# Other spellings accepted where users type them (the CLI, eval systems).
SAMPLER_ALIASES = {"dpmpp": "dpmpp2m"}
# The posteriors one fused step (ops.sampler_step) computes; DPM-Solver++ is built from
# "ddim" steps to t = 0.
STEP_SAMPLERS = ("ddpm", "ddim")

THRESHOLDS = ("dynamic", "static", "none")
PREDICTIONS = ("eps", "v")
ACTIVATIONS = ("silu", "gelu", "none")

# Attention: a query whose keys are all masked outputs zeros (and gets zero gradients),
# and the log-sum-exp saved for its backward is the log of an empty sum, -inf. Every
# backend of imagen_fast.ops and the Pallas kernel of imagen_fast.jax keep this.
MASKED_ROW_LSE = float("-inf")
