"""Example analytics shipped with scalebus (the demo runs ``fastq_qc``)."""
