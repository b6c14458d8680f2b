"""Train time (design notes §2): a corpus becomes a bank.

Read and split documents (corpus), chunk and embed them (chunks), cluster them (cluster), train
one LoRA per cluster with the one trainer (train, executors), and write the bank (pipeline);
`reference` imports a bank in the paper's reference-code layout.
"""
