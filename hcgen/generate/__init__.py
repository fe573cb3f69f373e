"""`hcgen generate`: the resumable generation run and the merge of its shards."""
