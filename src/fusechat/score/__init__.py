"""`fusechat score`: reward model (`reward_model`), math verifier (`math_check`), code sandbox (`sandbox`,
`sandbox_boot`) and the stage (`stage.run_score`). Module names avoid stdlib names (`math`, `code`)."""
