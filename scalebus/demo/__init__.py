"""The embedded demo: a synthetic genomics data set, its analytics (FASTQ QC) and the run of the whole system."""
