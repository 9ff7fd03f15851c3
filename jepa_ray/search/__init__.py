"""Similar-case search over a prepared archive: `index` embeds the shards with an exported encoder
and keeps the vectors, with each sample's safe metadata, in a FAISS index (local or s3://);
`search` finds the nearest cases to a sample of the archive or to a new DICOM file."""
