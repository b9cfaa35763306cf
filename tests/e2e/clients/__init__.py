"""Real Jupyter clients on SSH kernels: JupyterLab, jupyter console, nbclient, papermill,
README's embedding example, and the argv launcher for clients that ignore provisioners."""
