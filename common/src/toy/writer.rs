//! Writing the toy dataset: rows as snappy-compressed parquet shards in Pick-a-Pic's schema,
//! each written under a temporary name and renamed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::row::toy_row;
use super::{TOY_ROWS_PER_ROW_GROUP, TOY_ROWS_PER_SHARD};
use crate::dataset::DatasetError;

/// Write `rows` toy rows for `seed` into `dir` as snappy-compressed parquet shards
/// `toy-00000.parquet`, `toy-00001.parquet`, ... of at most [`TOY_ROWS_PER_SHARD`] rows, and
/// return their paths in order. Each shard is written under a temporary name and renamed, and
/// stale `toy-*.parquet` shards from a larger earlier run are removed.
pub fn write_toy_dataset(
    dir: impl AsRef<Path>,
    rows: usize,
    seed: u64,
) -> Result<Vec<PathBuf>, DatasetError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| DatasetError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let shards = rows.div_ceil(TOY_ROWS_PER_SHARD);
    remove_stale_shards(dir, shards)?;
    let mut paths = Vec::with_capacity(shards);
    for shard in 0..shards {
        let start = shard * TOY_ROWS_PER_SHARD;
        let end = rows.min(start + TOY_ROWS_PER_SHARD);
        let path = dir.join(shard_name(shard));
        write_shard(&path, seed, start as u64..end as u64)?;
        paths.push(path);
    }
    tracing::debug!(dir = %dir.display(), rows, shards, "wrote toy dataset");
    Ok(paths)
}

fn shard_name(shard: usize) -> String {
    format!("toy-{shard:05}.parquet")
}

fn remove_stale_shards(dir: &Path, keep: usize) -> Result<(), DatasetError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let index = name
            .strip_prefix("toy-")
            .and_then(|n| n.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<usize>().ok());
        if index.is_some_and(|i| i >= keep) {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// The schema of toy shards: Pick-a-Pic's required columns plus an extra `ranking_id`.
pub fn toy_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("ranking_id", DataType::Int64, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("jpg_0", DataType::Binary, true),
        Field::new("jpg_1", DataType::Binary, true),
        Field::new("label_0", DataType::Float64, true),
        Field::new("label_1", DataType::Float64, true),
    ]))
}

fn write_shard(path: &Path, seed: u64, rows: std::ops::Range<u64>) -> Result<(), DatasetError> {
    let tmp = path.with_extension("parquet.tmp");
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { path, source }
    };
    let parquet_err = |source| DatasetError::Parquet {
        file: path.to_path_buf(),
        source,
    };
    let schema = toy_schema();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(TOY_ROWS_PER_ROW_GROUP))
        .build();
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut writer =
        ArrowWriter::try_new(file, Arc::clone(&schema), Some(props)).map_err(parquet_err)?;
    let mut start = rows.start;
    while start < rows.end {
        let end = rows.end.min(start + TOY_ROWS_PER_ROW_GROUP as u64);
        let batch = toy_batch(path, &schema, seed, start..end)?;
        writer.write(&batch).map_err(parquet_err)?;
        start = end;
    }
    writer.close().map_err(parquet_err)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn toy_batch(
    path: &Path,
    schema: &Arc<Schema>,
    seed: u64,
    rows: std::ops::Range<u64>,
) -> Result<RecordBatch, DatasetError> {
    let ids: Vec<i64> = rows.clone().map(|i| i as i64).collect();
    let rows = rows
        .map(|i| toy_row(seed, i))
        .collect::<Result<Vec<_>, _>>()?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids)),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.caption.as_str()),
        )),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.jpg_0.as_slice()),
        )),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.jpg_1.as_slice()),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.label_0),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.label_1),
        )),
    ];
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|source| DatasetError::Arrow {
        file: path.to_path_buf(),
        source,
    })
}
