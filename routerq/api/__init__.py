"""`routerq serve`: OpenAI's Files and Batches API over routerq, for producers in any language."""
